"""Real-time Semantic Segmentation with Fast Attention (FANet) — https://arxiv.org/abs/2007.03815

Native 2D: queries and keys are l2-normalised over channels (cosine similarity) and the softmax is
dropped, so (1/n)·Q̂ K̂ᵀ V is computed as (1/n)·Q̂ (K̂ᵀ V) in O(n·c²) instead of O(n²·c).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import AttnBlock, factory_kwargs
from ..registry import register_attn


def fast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(1/n)·Q (Kᵀ V) for channel-first tokens q, k (B, d, n) and v (B, c, n); returns (B, c, n).

    The (d × c) matrix Kᵀ V is formed first, so no n × n matrix exists.
    """
    kv = torch.bmm(k, v.transpose(1, 2))  # (B, d, c)
    return torch.bmm(kv.transpose(1, 2), q) / q.shape[-1]


def _conv_bn(cin: int, cout: int, dd: dict, act: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 1, bias=False, **dd), nn.BatchNorm2d(cout, **dd)]
    if act:
        layers.append(nn.LeakyReLU())
    return nn.Sequential(*layers)


@register_attn(
    "fanet",
    title="Real-time Semantic Segmentation with Fast Attention",
    arxiv="2007.03815",
    year=2020,
    family="linear",
    complexity="O(N·D²)",
    flops_exponent=1.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="cosine-similarity attention without softmax, computed as Q̂(K̂ᵀV)/n",
    reference="https://github.com/feinanshan/FANet",
)
class FastAttention(AttnBlock):
    """Fast attention module: ``x + W(y)``, ``y = (1/n)·Q̂ (K̂ᵀ V)``, n = H·W.

    As in the official code: Q and K are 1x1 conv + BN to ``qk_channels`` (32), V is 1x1 conv +
    BN + LeakyReLU to C channels, and the output transform W is 1x1 conv + BN + LeakyReLU whose BN
    scale is zero-initialised here, so the block is the identity at initialisation. The 1/n of the
    paper is kept (the official code omits it): cosine similarities are in [-1, 1], so y is a
    bounded average of values at any resolution.

    Args:
        channels: input channels C.
        qk_channels: query/key width (paper and official code: 32).
    """

    def __init__(self, channels: int, *, qk_channels: int = 32, device=None, dtype=None) -> None:
        super().__init__(channels)
        if isinstance(qk_channels, bool) or not isinstance(qk_channels, int) or qk_channels < 1:
            raise ValueError(f"fanet: qk_channels must be a positive int, got {qk_channels!r}")
        dd = factory_kwargs(device, dtype)
        self.qk_channels = qk_channels
        self.query = _conv_bn(channels, qk_channels, dd, act=False)
        self.key = _conv_bn(channels, qk_channels, dd, act=False)
        self.value = _conv_bn(channels, channels, dd, act=True)
        self.out = _conv_bn(channels, channels, dd, act=True)
        nn.init.zeros_(self.out[1].weight)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q̂, K̂ (B, d, n), l2-normalised over channels, and V (B, C, n)."""
        q = F.normalize(rearrange(self.query(x), "b d h w -> b d (h w)"), dim=1)
        k = F.normalize(rearrange(self.key(x), "b d h w -> b d (h w)"), dim=1)
        v = rearrange(self.value(x), "b c h w -> b c (h w)")
        return q, k, v

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fast_attention(*self.qkv(x))
        return x + self.out(rearrange(y, "b c (h w) -> b c h w", h=x.shape[-2]))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, qk_channels={self.qk_channels}"
