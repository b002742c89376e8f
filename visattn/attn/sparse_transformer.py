"""Generating Long Sequences with Sparse Transformers — https://arxiv.org/abs/1904.10509

2D adaptation: the image is the raster sequence, viewed as rows of the stride l (default l = W, the paper's
choice for images, so the rows are the image rows). Strided: A1 = the previous l positions (|i - j| <= l when
not causal), A2 = every l-th position (the column). Fixed: A1 = the own block (row), A2 = the last c positions
of every block (the last c columns). One "merged" head attends the union A1 ∪ A2 under one softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layers import AttnBlock, resolve_heads, to_map, to_tokens
from ..layers.sparse_pattern import (
    Grid,
    Pattern,
    PatternAttention,
    column_segment,
    row_segment,
    segment_coords,
    shared_segment,
)
from ..registry import register_attn


@register_attn(
    "sparse_transformer",
    title="Generating Long Sequences with Sparse Transformers",
    arxiv="1904.10509",
    year=2019,
    family="sparse",
    complexity="O(N·√N·D)",
    flops_exponent=1.5,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="factorised attention: previous l + every l-th position (strided) or own block + summaries (fixed)",
    reference="https://github.com/openai/sparse_attention",
)
class SparseTransformer(AttnBlock):
    """Strided or fixed factorised attention (merged head), ``x + proj(attn(x))``, zero-initialised proj.

    Args:
        channels: input channels C.
        pattern: "strided" (the paper's choice for images) or "fixed".
        stride: l, the block length in raster positions (default None: the map width W).
        summary: c, summary positions per block of the fixed pattern (paper: c in {8, 16, 32}; clipped to l).
        heads: attention heads (default: ``default_heads(C)``).
        qkv_bias: bias in the q/k/v projections.
        causal: keys at or before the query in raster order (the paper's autoregressive setting).
    """

    def __init__(
        self,
        channels: int,
        *,
        pattern: str = "strided",
        stride: int | None = None,
        summary: int = 8,
        heads: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if pattern not in ("strided", "fixed"):
            raise ValueError(f"sparse_transformer: pattern must be 'strided' or 'fixed', got {pattern!r}")
        if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
            raise ValueError(f"sparse_transformer: stride must be None or an int >= 1, got {stride!r}")
        if summary < 1:
            raise ValueError(f"sparse_transformer: summary must be >= 1, got {summary}")
        heads = resolve_heads(channels, heads, "sparse_transformer")
        self.kind, self.stride, self.summary, self.causal = pattern, stride, summary, causal
        self.attn = PatternAttention(channels, heads, qkv_bias=qkv_bias, device=device, dtype=dtype)

    def pattern(self, height: int, width: int, device=None) -> Pattern:
        """A1 ∪ A2 for an ``height x width`` map, on the (ceil(N / l), l) grid of the raster sequence."""
        n = height * width
        l = width if self.stride is None else self.stride
        grid = Grid(-(-n // l), l, length=n)
        if self.kind == "strided":
            band = row_segment(grid, (-1, 0) if self.causal else (-1, 0, 1), radius=l, device=device)
            # A2 minus what the band already holds (rows r-1, r, r+1 of the column), to stay disjoint.
            segments = (band, column_segment(grid, min_row_distance=2, device=device))
        else:
            c = min(self.summary, l)
            cols = torch.arange(l - c, l, device=device)
            summaries = (torch.arange(grid.rows, device=device)[:, None] * l + cols).reshape(-1)
            seg = shared_segment(grid, summaries)
            (q_row, _), (k_row, _) = segment_coords(grid, seg)
            # The own block's summaries belong to A1 already.
            seg = seg._replace(member=k_row[:, None, :] != q_row[:, :, None])
            segments = (row_segment(grid, (0,), device=device), seg)
        return Pattern(grid, segments, self.causal)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pattern = self.pattern(h, w, x.device)
        t = to_tokens(x)
        # Pad the raster sequence at its end (after every real position: causal-safe, masked as keys).
        tp = F.pad(t, (0, 0, 0, pattern.grid.n - h * w))
        out = self.attn(tp, pattern)[:, : h * w]
        return x + to_map(out, h, w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, pattern={self.kind!r}, stride={self.stride}, causal={self.causal}"
