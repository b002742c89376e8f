"""Longformer: The Long-Document Transformer — https://arxiv.org/abs/2004.05150

2D adaptation (as in Vision Longformer): the 1D sliding window becomes a k x k window around each pixel
(optionally dilated; out-of-map keys are excluded, windows are not shifted at borders), plus a few learned
global tokens with their own projections (Q_g, K_g, V_g) that attend to every pixel; every pixel attends
to its window and to the global tokens under one softmax. With ``causal=True`` the window keeps only the
past and the global tokens do not read the map (they stay learned constants), so nothing leaks.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import (
    AttnBlock,
    check_odd_kernel,
    factory_kwargs,
    multihead_sdpa,
    resolve_heads,
    to_tokens,
)
from ..layers.sparse_pattern import (
    Grid,
    Pattern,
    PatternAttention,
    ceil_div,
    crop_to_map,
    pad_to_grid,
    window_segment,
    window_tile,
    with_shared_keys,
)
from ..registry import register_attn


@register_attn(
    "longformer",
    title="Longformer: The Long-Document Transformer",
    arxiv="2004.05150",
    year=2020,
    family="sparse",
    complexity="O(N·(k² + g)·D)",
    flops_exponent=1.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="k x k sliding-window attention (optionally dilated) + learned global tokens with own projections",
    reference="https://github.com/allenai/longformer",
)
class Longformer(AttnBlock):
    """Sliding-window + global attention, ``x + proj(attn(x))`` with a zero-initialised projection.

    Args:
        channels: input channels C.
        kernel_size: window size k (odd; 15 as in Vision Longformer, the 2D form of the paper's w).
        dilation: window dilation (the paper dilates windows in some heads/layers of its LM; 1 = none).
        num_global: learned global tokens g (Vision Longformer: 1); 0 disables global attention.
        heads: attention heads (default: ``default_heads(C)``).
        qkv_bias: bias in the q/k/v projections.
        causal: window keys at or before the query in raster order; globals do not read the map.
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int = 15,
        dilation: int = 1,
        num_global: int = 1,
        heads: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        check_odd_kernel(kernel_size, "longformer")
        if dilation < 1:
            raise ValueError(f"longformer: dilation must be >= 1, got {dilation}")
        if num_global < 0:
            raise ValueError(f"longformer: num_global must be >= 0, got {num_global}")
        heads = resolve_heads(channels, heads, "longformer")
        dd = factory_kwargs(device, dtype)
        self.kernel_size, self.dilation, self.num_global = kernel_size, dilation, num_global
        self.heads, self.causal = heads, causal
        # Q_s, K_s, V_s: pixels attend their window and the global tokens.
        self.attn = PatternAttention(channels, heads, qkv_bias=qkv_bias, **dd)
        if num_global:
            self.global_tokens = nn.Parameter(torch.randn(num_global, channels, **dd) * 0.02)
        if num_global and not causal:
            # Q_g, K_g, V_g: the global tokens attend to every pixel (and to each other) first.
            self.q_g = nn.Linear(channels, channels, bias=qkv_bias, **dd)
            self.kv_g = nn.Linear(channels, 2 * channels, bias=qkv_bias, **dd)
            self.proj_g = nn.Linear(channels, channels, **dd)

    def pattern(self, height: int, width: int, device=None) -> Pattern:
        """Window (+ global tokens as extra keys) for an ``height x width`` map, on the padded grid."""
        tile = window_tile(self.kernel_size, height, width, self.dilation)
        rows = ceil_div(height, tile[0] * self.dilation) * tile[0] * self.dilation
        cols = ceil_div(width, tile[1] * self.dilation) * tile[1] * self.dilation
        grid = Grid(rows, cols, height, width)
        seg = window_segment(
            grid, self.kernel_size, self.dilation, tile=tile, causal=self.causal, device=device
        )
        if self.num_global:
            seg = with_shared_keys(seg, torch.arange(grid.n, grid.n + self.num_global, device=device))
        return Pattern(grid, (seg,), self.causal, extra=self.num_global)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        pattern = self.pattern(h, w, x.device)
        extra = self.global_tokens if self.num_global else None
        if self.num_global and not self.causal:
            g = self.global_tokens.expand(b, -1, -1)
            k, v = self.kv_g(torch.cat([to_tokens(x), g], dim=1)).chunk(2, dim=-1)
            q = self.q_g(self.global_tokens).expand(b, -1, -1)
            extra = self.global_tokens + self.proj_g(multihead_sdpa(q, k, v, self.heads))
        xp = pad_to_grid(x, pattern.grid.rows, pattern.grid.cols)
        out = self.attn(to_tokens(xp), pattern, extra)
        return x + crop_to_map(out, pattern.grid, *x.shape[-2:])

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
            f"num_global={self.num_global}, causal={self.causal}"
        )
