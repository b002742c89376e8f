"""Rethinking Attention with Performers (FAVOR+) — https://arxiv.org/abs/2009.14794

Sequence method on the flattened map (raster order): pre-norm tokens plus a fixed 2D sin-cos
position code, multi-head linear attention with positive orthogonal random features of the
softmax kernel; causal=True uses the prefix-sum form as a chunked scan whose key stabiliser is a
running max (exact and causal, unlike a max over the whole sequence).
"""

from __future__ import annotations

import math

import torch

from ..layers.linear_attention import (
    KernelAttnBlock,
    RandomFeatures,
    favor_plus_features,
    relu_kernel_features,
)
from ..registry import register_attn


@register_attn(
    "performer",
    title="Rethinking Attention with Performers",
    arxiv="2009.14794",
    year=2020,
    family="linear",
    complexity="O(N·m·D)",
    flops_exponent=1.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="softmax kernel estimated by positive orthogonal random features (FAVOR+): φ(Q)(φ(K)ᵀV)",
    reference="https://github.com/lucidrains/performer-pytorch",
)
class Performer(KernelAttnBlock):
    """FAVOR+ attention: exp(q·k/√d) ≈ φ(q)·φ(k) with φ(x) = exp(Wx − ‖x‖²/2), W orthogonal Gaussian.

    The projection W lives in a buffer drawn from a seeded generator (deterministic in eval,
    restored by load_state_dict); in training it is redrawn every ``redraw_interval`` forward calls,
    counted in a buffer (count and redraw are one custom op, so training compiles as a single graph
    too, with the same draws at the same calls as eager).

    Args:
        channels: input channels C.
        heads: attention heads (default: heads of 32 channels, ``default_heads``).
        num_features: random features m (default d·ln d, the paper's Θ(d log d); d = head dim).
        kernel: "softmax" (FAVOR+ positive features) or "relu" (generalised attention,
            φ(x) = ReLU(Wx) + 1e-3).
        orthogonal: orthogonal random features (paper: True).
        scaling: row norms of W, "chi" (Gaussian norms, unbiased) or "sqrt_d".
        redraw_interval: training calls between feature redraws (0: never).
        seed: base seed of the draws (None: from the global RNG at construction).
        eps: denominator epsilon.
        chunk_size: chunk length of the causal scan; None (default) chooses it for the device
            at call time (visattn.layers.linear_attention.default_chunk_size), an int overrides it.
        causal: raster-order causal attention.
    """

    _recompute = False

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        num_features: int | None = None,
        kernel: str = "softmax",
        orthogonal: bool = True,
        scaling: str = "chi",
        redraw_interval: int = 1000,
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
            recompute=self._recompute,
            device=device,
            dtype=dtype,
        )
        name = self._block_name()
        d = self.head_dim
        if num_features is None:
            num_features = max(1, int(d * math.log(d)))
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if kernel not in ("softmax", "relu"):
            raise ValueError(f"{name}: kernel must be 'softmax' or 'relu', got {kernel!r}")
        if scaling not in ("chi", "sqrt_d"):
            raise ValueError(f"{name}: scaling must be 'chi' or 'sqrt_d', got {scaling!r}")
        if isinstance(redraw_interval, bool) or not isinstance(redraw_interval, int) or redraw_interval < 0:
            raise ValueError(f"{name}: redraw_interval must be an int >= 0, got {redraw_interval!r}")
        self.kernel = kernel
        self.random_features = RandomFeatures(
            num_features,
            d,
            orthogonal=orthogonal,
            scaling=scaling,
            redraw_interval=redraw_interval,
            seed=seed,
            device=device,
            dtype=dtype,
        )

    def features(self, q: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor):
        w = self.random_features.current()
        if self.kernel == "relu":
            s = q.shape[-1] ** -0.25
            return relu_kernel_features(q * s, w), relu_kernel_features(k * s, w), None
        return favor_plus_features(q, k, w, causal=self.causal)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self.random_features.step()
        return super()._forward(x)
