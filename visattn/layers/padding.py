"""Pad a map to window/block/stride multiples and crop back, so every block takes any H, W >= 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = ["ceil_div", "pad_to_grid", "pad_to_multiple", "unpad"]


def ceil_div(a, b: int):
    """``ceil(a / b)`` for sizes ``a >= 0``, ``b >= 1``, as ``(a + b - 1) // b``: the exporter writes
    ``-(-a // b)`` on a symbolic size as an ONNX Div, which truncates instead of flooring negatives."""
    return (a + b - 1) // b


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, (int, torch.SymInt)) else (v[0], v[1])


def _pad(x: torch.Tensor, pads, value: float = 0.0) -> torch.Tensor:
    """``F.pad`` of the last two dims, skipped only where the pads are provably zero: a branch on a
    symbolic (exported) size would pin the graph to that size."""
    if all(statically_known_true(p == 0) for p in pads):
        return x
    return F.pad(x, pads, value=value)


def pad_to_grid(x: torch.Tensor, rows, cols, *, value: float = 0.0) -> torch.Tensor:
    """Pad a (..., h, w) map at the bottom/right to ``rows x cols`` (sizes may be symbolic)."""
    return _pad(x, (0, cols - x.shape[-1], 0, rows - x.shape[-2]), value)


def pad_to_multiple(
    x: torch.Tensor, multiple: int | tuple[int, int], *, center: bool = False, value: float = 0.0
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Pad the last two dims of ``x`` up to multiples of ``multiple`` = (mh, mw).

    Padding goes at the bottom/right (which keeps raster-causal blocks causal) unless ``center``
    splits it between both sides, as mmsegmentation's ISA head does. Returns the padded tensor and
    the ``(left, right, top, bottom)`` amounts for :func:`unpad`.
    """
    mh, mw = _pair(multiple)
    if mh < 1 or mw < 1:
        raise ValueError(f"pad_to_multiple: multiple must be >= 1, got {(mh, mw)}")
    h, w = x.shape[-2:]
    ph, pw = ceil_div(h, mh) * mh - h, ceil_div(w, mw) * mw - w
    if center:
        pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    else:
        pads = (0, pw, 0, ph)
    return _pad(x, pads, value), pads


def unpad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple` on the last two dims."""
    left, right, top, bottom = pads
    h, w = x.shape[-2:]
    return x[..., top : h - bottom, left : w - right]
