"""Axial Attention in Multidimensional Transformers — https://arxiv.org/abs/1912.12180

Native 2D: multi-head self-attention along the height axis, then along the width axis, each a
residual step, O(N·(H+W)·D). ``causal=True`` masks both axes (column: rows above; row: pixels to
the left), so every output depends only on inputs at or before it in raster order.
"""

from __future__ import annotations

import torch
from einops import rearrange

from ..layers import AttnBlock, MultiHeadAttention, resolve_heads
from ..registry import register_attn


@register_attn(
    "axial",
    title="Axial Attention in Multidimensional Transformers",
    arxiv="1912.12180",
    year=2019,
    family="structured2d",
    complexity="O(N·(H+W)·D)",
    flops_exponent=1.5,
    native_2d=True,
    causal=True,
    identity_init=True,
    idea="self-attention along one axis at a time: columns, then rows",
    reference="https://github.com/lucidrains/axial-attention",
)
class AxialAttention(AttnBlock):
    """Column attention then row attention, each ``x + proj(attn(x))`` with a zero-initialised
    output projection (identity at initialisation).

    Args:
        channels: input channels C.
        heads: attention heads (default: C // 32, at least 1, dividing C).
        qkv_bias: bias in the q/k/v projections.
        causal: raster-order causal masking on both axes.
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        heads = resolve_heads(channels, heads, "axial")
        self.causal = causal
        self.attn_h = MultiHeadAttention(channels, heads, qkv_bias=qkv_bias, device=device, dtype=dtype)
        self.attn_w = MultiHeadAttention(channels, heads, qkv_bias=qkv_bias, device=device, dtype=dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        cols = rearrange(x, "b c h w -> (b w) h c")
        cols = cols + self.attn_h(cols, causal=self.causal)
        rows = rearrange(cols, "(b w) h c -> (b h) w c", w=w)
        rows = rows + self.attn_w(rows, causal=self.causal)
        return rearrange(rows, "(b h) w c -> b c h w", h=h)
