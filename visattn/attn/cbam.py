"""CBAM: Convolutional Block Attention Module — https://arxiv.org/abs/1807.06521

Native 2D: a channel gate (shared MLP over avg- and max-pooled descriptors) followed by a spatial
gate (7x7 conv over the channel-wise max and mean maps), both sigmoid, applied sequentially.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import make_divisible

from ..layers import AttnBlock, factory_kwargs
from ..registry import register_attn


@register_attn(
    "cbam",
    title="CBAM: Convolutional Block Attention Module",
    arxiv="1807.06521",
    year=2018,
    family="gate",
    complexity="O(N·D + D²/r + N·k²)",
    flops_exponent=1.0,
    native_2d=True,
    causal=False,
    identity_init=False,
    idea="channel gate from avg+max pooled MLP, then a spatial gate from a 7x7 conv over max/mean maps",
    reference="https://github.com/Jongchan/attention-module",
)
class CBAM(AttnBlock):
    """Channel gate then spatial gate, multiplicative (so not identity at initialisation).

    Args:
        channels: input channels C.
        reduction: MLP reduction ratio r (paper: 16); hidden width is ``make_divisible(C / r, 8)``.
        spatial_kernel: spatial gate kernel size (paper: 7).
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        spatial_kernel: int = 7,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if reduction < 1:
            raise ValueError(f"cbam: reduction must be >= 1, got {reduction}")
        if spatial_kernel < 1 or spatial_kernel % 2 == 0:
            raise ValueError(f"cbam: spatial_kernel must be odd and >= 1, got {spatial_kernel}")
        dd = factory_kwargs(device, dtype)
        hidden = make_divisible(channels / reduction, 8)
        # One MLP shared by both pooled descriptors, as in the paper (1x1 convs = per-channel linear).
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, **dd),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, **dd),
        )
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2, **dd)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        channel_logits = self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))
        x = x * channel_logits.sigmoid()
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return x * self.spatial(pooled).sigmoid()
