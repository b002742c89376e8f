"""Pad a map to window/block/stride multiples and crop back, so every block takes any H, W >= 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ceil_div", "pad_to_multiple", "unpad"]


def ceil_div(a, b: int):
    """``ceil(a / b)`` for sizes ``a >= 0``, ``b >= 1``, as ``(a + b - 1) // b``: the exporter writes
    ``-(-a // b)`` on a symbolic size as an ONNX Div, which truncates instead of flooring negatives."""
    return (a + b - 1) // b


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, (int, torch.SymInt)) else (v[0], v[1])


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
    # Padding kept when exporting (a zero pad is a no-op): a branch on symbolic H, W would specialise.
    ph, pw = ceil_div(h, mh) * mh - h, ceil_div(w, mw) * mw - w
    if center:
        pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    else:
        pads = (0, pw, 0, ph)
    if torch.compiler.is_exporting() or ph or pw:
        x = F.pad(x, pads, value=value)
    return x, pads


def unpad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple` on the last two dims."""
    left, right, top, bottom = pads
    h, w = x.shape[-2:]
    return x[..., top : h - bottom, left : w - right]
