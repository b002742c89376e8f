"""Transformer on a Diet (dilated variant) — https://arxiv.org/abs/2002.06170

2D adaptation: the paper's dilated sparse mask (layer l attends k = 3 positions spaced by d = 2^l) becomes a
dilated k x k neighbourhood on the feature map: pixel (i, j) attends (i + d*a, j + d*b), |a|, |b| <= k // 2,
out-of-map keys excluded (not shifted). ``causal=True`` keeps the neighbours at or before (i, j) in raster
order. Computed per dilation phase on halo tiles (shared sparse-pattern engine), never as a dense mask.
"""

from __future__ import annotations

import torch

from ..layers import AttnBlock, check_odd_kernel, resolve_heads, to_tokens
from ..layers.sparse_pattern import (
    Grid,
    Pattern,
    PatternAttention,
    ceil_div,
    crop_to_map,
    pad_to_grid,
    window_segment,
    window_tile,
)
from ..registry import register_attn


@register_attn(
    "diet",
    title="Transformer on a Diet",
    arxiv="2002.06170",
    year=2020,
    family="sparse",
    complexity="O(N·k²·D)",
    flops_exponent=1.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="dilated k x k neighbourhood attention (dilation 2^l in layer l), never a dense score matrix",
    reference="https://github.com/cgraywang/transformer-on-diet",
)
class Diet(AttnBlock):
    """Dilated neighbourhood self-attention, ``x + proj(attn(x))`` with a zero-initialised projection.

    Args:
        channels: input channels C.
        kernel_size: neighbourhood size k (odd; paper: 3 positions).
        dilation: spacing d between neighbours (paper: 2^l in layer l; 1 is layer 0).
        heads: attention heads (default: ``default_heads(C)``, heads of 32 channels).
        qkv_bias: bias in the q/k/v projections.
        causal: attend only to neighbours at or before the query in raster order.
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int = 3,
        dilation: int = 1,
        heads: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        check_odd_kernel(kernel_size, "diet")
        if dilation < 1:
            raise ValueError(f"diet: dilation must be >= 1, got {dilation}")
        heads = resolve_heads(channels, heads, "diet")
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.causal = causal
        self.attn = PatternAttention(channels, heads, qkv_bias=qkv_bias, device=device, dtype=dtype)

    def pattern(self, height: int, width: int, device=None) -> Pattern:
        """The key sets for an ``height x width`` map, on the padded grid :meth:`forward` uses."""
        tile = window_tile(self.kernel_size, height, width, self.dilation)
        rows = ceil_div(height, tile[0] * self.dilation) * tile[0] * self.dilation
        cols = ceil_div(width, tile[1] * self.dilation) * tile[1] * self.dilation
        grid = Grid(rows, cols, height, width)
        seg = window_segment(
            grid, self.kernel_size, self.dilation, tile=tile, causal=self.causal, device=device
        )
        return Pattern(grid, (seg,), self.causal)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pattern = self.pattern(h, w, x.device)
        xp = pad_to_grid(x, pattern.grid.rows, pattern.grid.cols)
        out = self.attn(to_tokens(xp), pattern)
        return x + crop_to_map(out, pattern.grid, h, w)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"causal={self.causal}"
        )
