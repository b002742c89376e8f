"""The flatten/unflatten adapter that lets a sequence method run on a (B, C, H, W) map.

Tokens are in raster order: position p = i * W + j, the order the causal contract refers to.
"""

from __future__ import annotations

import torch
from einops import rearrange

__all__ = ["to_tokens", "to_map"]


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), raster order."""
    return rearrange(x, "b c h w -> b (h w) c")


def to_map(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W), the inverse of :func:`to_tokens`."""
    return rearrange(t, "b (h w) c -> b c h w", h=height, w=width)
