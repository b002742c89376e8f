"""Multi-scale Transformer Language Models (retina model) — https://arxiv.org/abs/2005.00581

2D adaptation of the retina model (a token attends to nearby tokens at full resolution and to distant ones
at progressively pooled resolutions): scale l averages 2^l x 2^l pixels (pool factor 2 per axis and scale);
a pixel attends the pixels of its fine neighbourhood and, at each coarser scale, the ring of pooled tokens
around it that the finer scales do not cover (visattn.layers.sparse_pyramid), so the scales tile the map.
Causal: a pooled token is visible only once all its pixels are at or before the query in raster order.
"""

from __future__ import annotations

import torch

from ..layers import (
    AttnBlock,
    factory_kwargs,
    resolve_heads,
    to_tokens,
)
from ..layers.sparse_pattern import PatternAttention, crop_to_map, pad_to_grid
from ..layers.sparse_pyramid import Pyramid, flatten_levels, pyramid_means, pyramid_pattern
from ..registry import register_attn


@register_attn(
    "multiscale",
    title="Multi-scale Transformer Language Models",
    arxiv="2005.00581",
    year=2020,
    family="sparse",
    complexity="O(N·r²·log N·D)",
    flops_exponent=1.1,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="retina attention: fine local window + progressively average-pooled coarse tokens for far context",
    reference="none",
)
class MultiScale(AttnBlock):
    """Retina multi-scale attention, ``x + proj(attn(x))`` with a zero-initialised projection.

    Args:
        channels: input channels C.
        radius: neighbourhood radius r in tokens of each scale: the fine window is the 2(2r+1) x 2(2r+1)
            pixel square around the query's 2 x 2 block, every coarser scale a ring of up to 3(2r+1)²
            pooled tokens.
        levels: scales that give keys (None: all, up to where one scale covers the map; 1: the fine window).
        heads: attention heads (default: ``default_heads(C)``).
        qkv_bias: bias in the q/k/v projections.
        causal: pixel keys at or before the query; pooled tokens only once all their pixels are.
    """

    def __init__(
        self,
        channels: int,
        *,
        radius: int = 2,
        levels: int | None = None,
        heads: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if radius < 1:
            raise ValueError(f"multiscale: radius must be >= 1, got {radius}")
        if levels is not None and levels < 1:
            raise ValueError(f"multiscale: levels must be >= 1 or None, got {levels}")
        heads = resolve_heads(channels, heads, "multiscale")
        self.radius, self.levels, self.heads, self.causal = radius, levels, heads, causal
        self.attn = PatternAttention(channels, heads, qkv_bias=qkv_bias, **factory_kwargs(device, dtype))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pyr = Pyramid.of(h, w, self.radius, self.levels)
        pattern = pyramid_pattern(pyr, causal=self.causal, device=x.device).pattern
        grid = pattern.grid
        # Pooling is linear, so k/v of a pooled token are the pooled k/v of its pixels.
        extra = flatten_levels(pyramid_means(x, pyr.depth))
        out = self.attn(to_tokens(pad_to_grid(x, grid.rows, grid.cols)), pattern, extra)
        return x + crop_to_map(out, grid, h, w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, radius={self.radius}, levels={self.levels}, causal={self.causal}"
