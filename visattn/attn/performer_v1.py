"""Masked Language Modeling for Proteins via Linearly Scalable Long-Context Transformers (Performer v1,
FAVOR) — https://arxiv.org/abs/2006.03555

Sequence method on the flattened map (raster order): pre-norm tokens plus a fixed 2D sin-cos
position code, multi-head linear attention with trigonometric (sin/cos) orthogonal random features
of the softmax kernel; causal=True is the prefix-sum form as a chunked scan.
"""

from __future__ import annotations

import math

import torch

from ..layers.linear_attention import KernelAttnBlock, RandomFeatures, trig_random_features
from ..registry import register_attn


@register_attn(
    "performer_v1",
    title="Masked Language Modeling for Proteins via Linearly Scalable Long-Context Transformers",
    arxiv="2006.03555",
    year=2020,
    family="linear",
    complexity="O(N·m·D)",
    flops_exponent=1.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    exportable=False,
    export_dynamic_hw=False,
    export_note=(
        "exports, but onnxruntime differs from eager by up to 1e2: the sin/cos features make the output "
        "ill-conditioned (at the check input 293 of 640 denominators are clamped; a 2^-24 relative input "
        "change moves the float64 output by 16 there, and float32 eager itself is off float64 by 71)"
    ),
    idea="softmax kernel estimated by sin/cos orthogonal random features (FAVOR): attention as φ(Q)(φ(K)ᵀV)",
    reference="https://github.com/google-research/google-research/tree/master/performer/fast_attention",
)
class PerformerV1(KernelAttnBlock):
    """FAVOR with trigonometric features: φ(x) = exp(‖x‖²/2)[sin Wx, cos Wx], W orthogonal Gaussian.

    The features are not positive, so a denominator (an estimate of Σ_j exp(q·k_j)) can come out
    <= 0 with few features; it is clamped to eps (the instability that motivated FAVOR+, see
    ``performer``). The projection is drawn once into a buffer from a seeded generator.

    Args:
        channels: input channels C.
        heads: attention heads (default: heads of 32 channels, ``default_heads``).
        num_features: random frequencies m, giving 2m features (default d·ln d; d = head dim).
        orthogonal: orthogonal random features (paper: True).
        seed: seed of the draw (None: from the global RNG at construction).
        eps: denominator epsilon.
        chunk_size: chunk length of the causal scan; None (default) chooses it for the device
            at call time (visattn.layers.linear_attention.default_chunk_size), an int overrides it.
        causal: raster-order causal attention.
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        num_features: int | None = None,
        orthogonal: bool = True,
        seed: int | None = None,
        eps: float = 1e-6,
        chunk_size: int | None = None,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            channels,
            heads=heads,
            causal=causal,
            chunk_size=chunk_size,
            eps=eps,
            device=device,
            dtype=dtype,
        )
        d = self.head_dim
        if num_features is None:
            num_features = max(1, int(d * math.log(d)))
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"{self._block_name()}: num_features must be a positive int, got {num_features!r}"
            )
        self.random_features = RandomFeatures(
            num_features, d, orthogonal=orthogonal, seed=seed, device=device, dtype=dtype
        )

    def features(self, q: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor):
        return trig_random_features(q, k, self.random_features.current(), causal=self.causal)
