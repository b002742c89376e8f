"""Landmark mixer cores (Nystrom)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from ..precision import accuracy_dtype
from .base import MixerCore

__all__ = ["NystromCore"]


class NystromCore(MixerCore):
    """Nyström approximation softmax(Q K̃ᵀ) pinv(softmax(Q̃ K̃ᵀ)) softmax(Q̃ Kᵀ) V with landmarks = the cell
    means of the patch q/k over an (lh, lw) grid (:func:`visattn.attn.nystrom.cell_means`) plus the prefix
    tokens. ``pinv_iterations=None`` uses an exact pseudo-inverse. The paper's depthwise conv skip on V is a
    new parameter that would change the pretrained function, so the mixer leaves it out. Dense limit:
    a landmark grid at least the patch grid (capped at it: every patch is a landmark), with the exact
    pseudo-inverse."""

    def __init__(self, dim: int, heads: int, *, landmarks: int | tuple[int, int] = 64,
                 pinv_iterations: int | None = 6) -> None:  # fmt: skip
        super().__init__(dim, heads)
        if isinstance(landmarks, int):
            side = math.isqrt(max(landmarks, 0))
            if landmarks < 1 or side * side != landmarks:
                raise ValueError(f"nystrom (ViT mixer): landmarks must be a perfect square, got {landmarks}")
            landmarks = (side, side)
        self.grid = tuple(landmarks)
        self.pinv_iterations = pinv_iterations

    def patches(self, q, k, v, grid, prefix):
        from ...attn.nystrom import cell_means, newton_schulz_pinv

        height, width = grid
        # More cells than patches along an axis would repeat patches as landmarks: they add nothing and make
        # the landmark kernel singular, so the landmark grid is capped at the patch grid.
        cells_hw = (min(self.grid[0], height), min(self.grid[1], width))

        def landmarks(t):
            cells = cell_means(rearrange(t[:, :, prefix:], "b h (y x) d -> b h d y x", y=height), cells_hw)
            return torch.cat([t[:, :, :prefix], rearrange(cells, "b h d y x -> b h (y x) d")], dim=2)

        q_land, k_land = landmarks(q), landmarks(k)
        scale = q.shape[-1] ** -0.5
        acc = accuracy_dtype(q.dtype)
        kernel_3_v = F.scaled_dot_product_attention(q_land, k, v).to(acc)
        kernel_2 = (q_land @ k_land.transpose(-1, -2) * scale).to(acc).softmax(dim=-1)
        if self.pinv_iterations is None:
            pinv = torch.linalg.pinv(kernel_2)
        else:
            pinv = newton_schulz_pinv(kernel_2, self.pinv_iterations)
        middle = (pinv @ kernel_3_v).to(v.dtype)
        return F.scaled_dot_product_attention(q[:, :, prefix:], k_land, middle)
