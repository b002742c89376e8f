"""Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention — https://arxiv.org/abs/2006.16236

Sequence method on the flattened map (raster order): pre-norm tokens plus a fixed 2D sin-cos
position code, multi-head φ(Q)(φ(K)ᵀV) with φ = elu + 1; causal=True is the paper's prefix-sum
(RNN) form, computed as a chunked scan (visattn.layers.linear_attention).
"""

from __future__ import annotations

import torch

from ..layers.linear_attention import KernelAttnBlock, elu_feature_map
from ..registry import register_attn


@register_attn(
    "linear",
    title="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
    arxiv="2006.16236",
    year=2020,
    family="linear",
    complexity="O(N·D²)",
    flops_exponent=1.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="kernel (elu(q)+1)·(elu(k)+1) instead of softmax: attention is φ(Q)(φ(K)ᵀV), causal by prefix sums",
    reference="https://github.com/idiap/fast-transformers",
)
class LinearAttention(KernelAttnBlock):
    """Linear attention with the elu + 1 feature map, residual and identity at initialisation.

    out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_j φ(k_j) + eps), j over all tokens or, causal,
    over tokens at or before i in raster order.

    Args:
        channels: input channels C.
        heads: attention heads (default: heads of 32 channels, ``default_heads``).
        eps: denominator epsilon (paper: 1e-6).
        chunk_size: chunk length of the causal scan, speed/memory only, not the result; None (default) chooses it for the device
            at call time (visattn.layers.linear_attention.default_chunk_size), an int overrides it.
        causal: raster-order causal attention.
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
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

    def features(self, q: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor):
        return elu_feature_map(q), elu_feature_map(k), None
