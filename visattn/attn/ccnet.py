"""CCNet: Criss-Cross Attention for Semantic Segmentation — https://arxiv.org/abs/1811.11721

Native 2D: each pixel attends to the H + W - 1 pixels of its row and column (its own position
counted once) with one joint softmax; R recurrences with shared weights give full-image context.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import AttnBlock, factory_kwargs
from ..registry import register_attn


def criss_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Criss-cross attention on (B, C, H, W) maps, never materialising an N x N tensor.

    Energies are (B, H, W, H + W): the column part excludes the pixel itself (-inf on the
    diagonal) so the centre is counted once, by the row part. No 1/sqrt(d) scaling, as in the paper.
    """
    h = q.shape[-2]
    energy_col = torch.einsum("bchw,bciw->bhwi", q, k)
    energy_row = torch.einsum("bchw,bchj->bhwj", q, k)
    self_in_col = torch.eye(h, dtype=torch.bool, device=q.device).unsqueeze(1)  # (H, 1, H): [i, :, i]
    energy_col = energy_col.masked_fill(self_in_col, float("-inf"))
    attn = torch.cat([energy_col, energy_row], dim=-1).softmax(dim=-1)
    attn_col, attn_row = attn.split([h, attn.shape[-1] - h], dim=-1)
    return torch.einsum("bhwi,bciw->bchw", attn_col, v) + torch.einsum("bhwj,bchj->bchw", attn_row, v)


@register_attn(
    "ccnet",
    title="CCNet: Criss-Cross Attention for Semantic Segmentation",
    arxiv="1811.11721",
    year=2019,
    family="structured2d",
    complexity="O(N·(H+W)·D)",
    flops_exponent=1.5,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="each pixel attends to its row and column jointly; two recurrences reach the whole image",
    reference="https://github.com/speedinghzl/CCNet",
)
class CrissCrossAttention(AttnBlock):
    """Criss-cross attention ``x <- x + γ · CCA(x)``, applied ``recurrence`` times with shared weights.

    γ is initialised to zero (as in the paper), so the block is the identity at initialisation.
    Submodule names follow mmcv's ``CrissCrossAttention`` so mmsegmentation checkpoints map by name.

    Args:
        channels: input channels C.
        reduction: query/key width C // reduction (paper: 8).
        recurrence: number of applications R (the paper's segmentation head uses 2).
    """

    def __init__(
        self, channels: int, *, reduction: int = 8, recurrence: int = 1, device=None, dtype=None
    ) -> None:
        super().__init__(channels)
        if reduction < 1:
            raise ValueError(f"ccnet: reduction must be >= 1, got {reduction}")
        if recurrence < 1:
            raise ValueError(f"ccnet: recurrence must be >= 1, got {recurrence}")
        dd = factory_kwargs(device, dtype)
        qk = max(1, channels // reduction)
        self.recurrence = recurrence
        self.query_conv = nn.Conv2d(channels, qk, 1, **dd)
        self.key_conv = nn.Conv2d(channels, qk, 1, **dd)
        self.value_conv = nn.Conv2d(channels, channels, 1, **dd)
        self.gamma = nn.Parameter(torch.zeros(1, **dd))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.recurrence):
            x = x + self.gamma * criss_cross_attention(
                self.query_conv(x), self.key_conv(x), self.value_conv(x)
            )
        return x
