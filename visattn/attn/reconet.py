"""Tensor Low-Rank Reconstruction for Semantic Segmentation (RecoNet) — https://arxiv.org/abs/2008.00490

Native 2D: the tensor generation module (TGM) makes r channel, height and width attention vectors
from pooled features; the tensor reconstruction module (TRM) sums their r rank-1 outer products
(a CP decomposition) into a C×H×W attention tensor A, and the context X ⊙ A is fused residually.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..layers import AttnBlock, factory_kwargs
from ..registry import register_attn


def cp_reconstruct(
    weights: torch.Tensor, vc: torch.Tensor, vh: torch.Tensor, vw: torch.Tensor
) -> torch.Tensor:
    """A[b, c, i, j] = Σ_r weights[r] · vc[b, r, c] · vh[b, r, i] · vw[b, r, j], shape (B, C, H, W).

    Computed as one (C × r) @ (r × H·W) product per sample: O(r·C·H·W), with an r×H×W
    intermediate instead of r full C×H×W rank-1 tensors.
    """
    spatial = rearrange(vh.unsqueeze(-1) * vw.unsqueeze(-2), "b r h w -> b r (h w)")
    channel = (vc * weights.to(vc.dtype).unsqueeze(-1)).transpose(1, 2)
    out = torch.bmm(channel, spatial.to(channel.dtype))
    return rearrange(out, "b c (h w) -> b c h w", h=vh.shape[-1])


@register_attn(
    "reconet",
    title="Tensor Low-Rank Reconstruction for Semantic Segmentation",
    arxiv="2008.00490",
    year=2020,
    family="lowrank",
    complexity="O(r·C·N + C²·N)",
    flops_exponent=1.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="rank-r CP reconstruction of a 3D C×H×W attention tensor from channel, height and width vectors",
    reference="none",
)
class RecoNet(AttnBlock):
    """TGM + TRM: ``x + proj(x ⊙ A)`` with ``A = Σ_i λ_i v_c^i ⊗ v_h^i ⊗ v_w^i``.

    Tensor generation (one sigmoid vector per rank-1 term and per mode):
    - channel: global average pool over H, W, then a 1x1 conv C -> r·C (the paper's r
      per-rank 1x1 convs stacked into one), sigmoid;
    - height / width: the paper pools over the two other modes and treats the H (W) positions as
      conv channels, which ties the block to one input size. Here the map is pooled over W (H)
      only and a 1x1 conv over the C channels gives the r height (width) vectors, sigmoid, so every
      rank-1 term still has its own learned height and width vectors at any H, W.

    Tensor reconstruction: the λ_i are learnable weights initialised to 1/r, so A starts as the
    average of the r rank-1 tensors (entries in (0, 1)). The paper concatenates X with the
    context X ⊙ A before the next conv; here a zero-initialised 1x1 conv of the context is added
    to X, so the block is the identity at initialisation.

    Args:
        channels: input channels C.
        rank: number r of rank-1 tensors (paper: 64).
    """

    def __init__(self, channels: int, *, rank: int = 64, device=None, dtype=None) -> None:
        super().__init__(channels)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"reconet: rank must be a positive int, got {rank!r}")
        dd = factory_kwargs(device, dtype)
        self.rank = rank
        self.channel_gen = nn.Linear(channels, rank * channels, **dd)
        self.height_gen = nn.Conv1d(channels, rank, 1, **dd)
        self.width_gen = nn.Conv1d(channels, rank, 1, **dd)
        self.rank_weights = nn.Parameter(torch.full((rank,), 1.0 / rank, **dd))
        self.proj = nn.Conv2d(channels, channels, 1, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """TGM: (λ (r,), v_c (B, r, C), v_h (B, r, H), v_w (B, r, W))."""
        vc = self.channel_gen(x.mean(dim=(2, 3))).sigmoid()
        vc = rearrange(vc, "b (r c) -> b r c", r=self.rank)
        vh = self.height_gen(x.mean(dim=3)).sigmoid()
        vw = self.width_gen(x.mean(dim=2)).sigmoid()
        return self.rank_weights, vc, vh, vw

    def attention_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """TRM: the reconstructed (B, C, H, W) attention tensor A."""
        return cp_reconstruct(*self.factors(x))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x * self.attention_tensor(x))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, rank={self.rank}"
