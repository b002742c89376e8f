"""Jukebox: A Generative Model for Music (factored attention) — https://arxiv.org/abs/2005.00341

2D adaptation: Jukebox factors its sequence into blocks of ``block_ctx`` positions and cycles layers through
block (row), transpose-block (column) and previous-block (previous row) attention. With ``block_ctx = W``
these are row, column and previous-row attention on the H x W map. One visattn block runs one full cycle:
three residual attention steps, each with its own projections. ``causal=True`` masks future keys (row and
column keys at or before the query; the previous row is entirely in the past; row 0 has none and gets 0).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import AttnBlock, factory_kwargs, resolve_heads, to_map, to_tokens
from ..layers.sparse_pattern import Grid, Pattern, PatternAttention, column_segment, row_segment
from ..registry import register_attn

_KINDS = ("row", "column", "prev_row")


@register_attn(
    "jukebox",
    title="Jukebox: A Generative Model for Music",
    arxiv="2005.00341",
    year=2020,
    family="sparse",
    complexity="O(N·(H + W)·D)",
    flops_exponent=1.5,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="factored attention cycling row, column and previous-row attention (block / transpose / prev-block)",
    reference="https://github.com/openai/jukebox",
)
class Jukebox(AttnBlock):
    """A cycle of factored attention steps, each ``x = x + proj_i(attn_i(x))`` (zero-initialised proj_i).

    Args:
        channels: input channels C.
        attn_order: the steps of the cycle, from "row", "column", "prev_row" (paper prior, attn_order 2:
            row, column, previous row).
        heads: attention heads (default: ``default_heads(C)``).
        qkv_bias: bias in the q/k/v projections.
        causal: mask keys after the query in raster order.
    """

    def __init__(
        self,
        channels: int,
        *,
        attn_order: tuple[str, ...] = ("row", "column", "prev_row"),
        heads: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        attn_order = (attn_order,) if isinstance(attn_order, str) else tuple(attn_order)
        if not attn_order or any(kind not in _KINDS for kind in attn_order):
            raise ValueError(
                f"jukebox: attn_order must be a non-empty sequence of {_KINDS}, got {attn_order!r}"
            )
        heads = resolve_heads(channels, heads, "jukebox")
        self.attn_order, self.causal = attn_order, causal
        self.steps = nn.ModuleList(
            PatternAttention(channels, heads, qkv_bias=qkv_bias, **factory_kwargs(device, dtype))
            for _ in attn_order
        )

    def pattern(self, kind: str, height: int, width: int, device=None) -> Pattern:
        """The key sets of one step (``kind`` in "row", "column", "prev_row") on an ``height x width`` map."""
        grid = Grid(height, width)
        if kind == "row":
            seg = row_segment(grid, (0,), device=device)
        elif kind == "column":
            seg = column_segment(grid, device=device)
        else:
            seg = row_segment(grid, (-1,), device=device)
        return Pattern(grid, (seg,), self.causal)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        t = to_tokens(x)
        for kind, step in zip(self.attn_order, self.steps, strict=False):
            t = t + step(t, self.pattern(kind, h, w, x.device))
        return to_map(t, h, w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, attn_order={self.attn_order}, causal={self.causal}"
