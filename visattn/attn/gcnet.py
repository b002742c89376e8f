"""GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond — https://arxiv.org/abs/1904.11492

Native 2D: one query-independent attention map pools a global context vector, a LayerNorm
bottleneck transforms it, and it is broadcast-added to every pixel.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange
from timm.layers import make_divisible

from ..layers import AttnBlock, factory_kwargs
from ..registry import register_attn


@register_attn(
    "gcnet",
    title="GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
    arxiv="1904.11492",
    year=2019,
    family="gate",
    complexity="O(N·D + D²/r)",
    flops_exponent=1.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="attention-pooled global context through a LayerNorm bottleneck, added to every pixel",
    reference="https://github.com/xvjiarui/GCNet",
)
class GlobalContextBlock(AttnBlock):
    """Global context block with attention pooling and channel-add fusion (the paper's GC-r16 block).

    The last conv of the transform is zero-initialised (as in the paper), so the block is the
    identity at initialisation.

    Args:
        channels: input channels C.
        reduction: bottleneck ratio r (paper: 16); width ``make_divisible(C / r, 8)``.
    """

    def __init__(self, channels: int, *, reduction: int = 16, device=None, dtype=None) -> None:
        super().__init__(channels)
        if reduction < 1:
            raise ValueError(f"gcnet: reduction must be >= 1, got {reduction}")
        dd = factory_kwargs(device, dtype)
        hidden = make_divisible(channels / reduction, 8)
        self.attn_logits = nn.Conv2d(channels, 1, 1, **dd)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, **dd),
            nn.LayerNorm([hidden, 1, 1], **dd),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, **dd),
        )
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = rearrange(self.attn_logits(x), "b 1 h w -> b (h w) 1").softmax(dim=1)
        context = torch.bmm(rearrange(x, "b c h w -> b c (h w)"), weights)  # (B, C, 1)
        return x + self.transform(context.unsqueeze(-1))
