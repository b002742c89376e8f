"""Position-indexed parameters defined on a reference grid and resampled to any H x W.

Fixed-length sequence methods (Synthesizer, input-independent attention, Linformer) learn tensors indexed by
token position. On images a position is a pixel of an (h_ref, w_ref) reference grid, and such a tensor is
resampled to the input's H x W by bilinear interpolation (``align_corners=False``; antialiased, so that
downsampling averages the reference pixels an output pixel covers instead of point-sampling them, while
upsampling is plain bilinear) along every grid axis it has: an attention map indexed (query, key) is a 4-D
(h_ref, w_ref, h_ref, w_ref) tensor and both grids are interpolated. The resampling is linear, so resampling
a map R is ``I R Iᵀ`` with I the (H·W, h_ref·w_ref) interpolation matrix; a factorised map R1 R2ᵀ therefore
resamples exactly to (I R1)(I R2)ᵀ, and at H x W = h_ref x w_ref, I is the identity.

This module is imported directly (``from ..layers.reference_grid import ...``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .precision import upcast_for_accuracy

__all__ = [
    "attend_with_weights",
    "causal_bias",
    "check_ref_size",
    "resample_attention_map",
    "resample_axis",
    "resample_grid",
]


def _pair(v: int | tuple[int, int], what: str) -> tuple[int, int]:
    h, w = (v, v) if isinstance(v, int) else tuple(v)
    if not (isinstance(h, int) and isinstance(w, int)) or h < 1 or w < 1:
        raise ValueError(f"{what} must be a positive int or a pair of positive ints, got {v!r}")
    return int(h), int(w)


def check_ref_size(ref_size, block: str) -> tuple[int, int]:
    """``ref_size`` as (h_ref, w_ref); ValueError naming ``block`` if it is not positive."""
    return _pair(ref_size, f"{block}: ref_size")


def _interpolate(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Always interpolated, even to the same size (then exactly the identity): a shape test here would
    # specialise torch.export / ONNX graphs to one resolution.
    if grid.dtype in (torch.float16, torch.bfloat16):
        # Antialiased resampling has no half-precision CPU kernel; float32 costs nothing at these sizes.
        out = F.interpolate(grid.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        return out.to(grid.dtype)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=False, antialias=True)


def resample_axis(t: torch.Tensor, size: int, dim: int = -1) -> torch.Tensor:
    """Resample dimension ``dim`` of ``t`` to ``size`` samples: the 1-D factor of :func:`resample_grid`
    (bilinear on a grid = this along H, then along W)."""
    moved = t.movedim(dim, -1)
    lead = moved.shape[:-1]
    out = _interpolate(moved.reshape(-1, 1, 1, moved.shape[-1]), (1, size))
    return out.reshape(*lead, size).movedim(-1, dim)


def resample_grid(
    t: torch.Tensor, ref_hw: tuple[int, int], hw: tuple[int, int], dim: int = -1
) -> torch.Tensor:
    """Resample dimension ``dim`` of ``t`` (h_ref·w_ref, raster order) to H·W (antialiased bilinear)."""
    (hr, wr), (h, w) = tuple(ref_hw), tuple(hw)
    moved = t.movedim(dim, -1)
    lead = moved.shape[:-1]
    grid = moved.reshape(-1, 1, hr, wr)
    out = _interpolate(grid, (h, w))
    return out.reshape(*lead, h * w).movedim(-1, dim)


def resample_attention_map(r: torch.Tensor, ref_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """(..., N_ref, N_ref) query-by-key map -> (..., N, N): both the key and the query grid interpolated."""
    return resample_grid(resample_grid(r, ref_hw, hw, dim=-1), ref_hw, hw, dim=-2)


def causal_bias(n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n, n) additive mask: 0 where key <= query in raster order, -inf above the diagonal.

    Added to logits (rather than ``masked_fill``) so autograd saves nothing for it; the diagonal is always
    open, so no softmax row is empty.
    """
    return torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu_(1)


def attend_with_weights(logits: torch.Tensor, v: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
    """softmax(logits) · v for explicit attention logits, with an optional raster-causal mask.

    ``logits`` is (h, N, N) when the attention weights are shared by the batch (input-independent maps) or
    (B, h, N, N); ``v`` is (B, h, N, d). The mask is applied after any resampling and the softmax
    renormalises over the keys that remain, so no future position leaks. The softmax runs in float32 (or
    float64 for float64 logits).
    """
    if causal:
        logits = logits + causal_bias(logits.shape[-1], device=logits.device, dtype=logits.dtype)
    attn = upcast_for_accuracy(logits).softmax(dim=-1).to(v.dtype)
    if attn.dim() == 3:
        # Batch-shared weights: fold the batch into the value columns so one (h, N, N) map is used as is,
        # rather than broadcast (and copied) B times by a batched matmul.
        b = v.shape[0]
        out = torch.bmm(attn, rearrange(v, "b h n d -> h n (b d)"))
        return rearrange(out, "h n (b d) -> b h n d", b=b)
    return attn @ v
