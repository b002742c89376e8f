"""Neural Architecture Search for Lightweight Non-Local Networks (AutoNL's LightNL) —
https://arxiv.org/abs/2004.01961

Native 2D: no embedding convs; the affinity uses the first r·C channels of x (queries) and of its
stride-s subsampled copy (keys), values are all channels of the subsampled copy, no softmax:
y = x_c (x_scᵀ x_s) / (H·W), then a 3x3 depthwise conv and a zero-initialised BN, residually added.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..layers import AttnBlock, factory_kwargs
from ..registry import register_attn


def lightnl_affinity(x: torch.Tensor, qk_channels: int, stride: int) -> torch.Tensor:
    """y = x_c (x_scᵀ x_s) / (H·W) for a (B, C, H, W) map; returns (B, C, H, W).

    Always in the Q(KᵀV) order: the (r·C × C) matrix x_scᵀ x_s first, so the cost is
    O(N·r·C²), never O(N²). Normalised by the full H·W even when keys are subsampled, as in the
    official code.
    """
    h, w = x.shape[-2:]
    small = x[:, :, ::stride, ::stride]
    keys = rearrange(small[:, :qk_channels], "b k h w -> b k (h w)")
    values = rearrange(small, "b c h w -> b (h w) c")
    context = torch.bmm(keys, values)  # (B, r·C, C)
    queries = rearrange(x[:, :qk_channels], "b k h w -> b k (h w)")
    y = torch.bmm(context.transpose(1, 2), queries) / (h * w)
    return rearrange(y, "b c (h w) -> b c h w", h=h)


@register_attn(
    "autonl",
    title="Neural Architecture Search for Lightweight Non-Local Networks",
    arxiv="2004.01961",
    year=2020,
    family="nonlocal",
    complexity="O(N·r·D²)",
    flops_exponent=1.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="softmax-free non-local on a channel subset and a strided copy of x, Q(KᵀV) order, depthwise output",
    reference="https://github.com/LiYingwei/AutoNL",
)
class LightNL(AttnBlock):
    """LightNL block: ``x + BN(DWConv3x3(x_c (x_scᵀ x_s) / (H·W)))``.

    The transformations are shared and removed (θ = φ = g = identity); compact features make the
    affinity cheap: x_c keeps the first ``channel_ratio·C`` channels, x_s subsamples positions with
    ``x[:, :, ::stride, ::stride]`` (so any H, W works without padding), x_sc does both. The BN
    scale is zero-initialised (the official ``nl_zero_init``), so the block starts as the
    identity; it matters here because the product is cubic in x and has no softmax.

    Args:
        channels: input channels C.
        channel_ratio: fraction r of channels used for the affinity (the NAS space has 0.25, 0.5,
            1.0; default is the most compact, 0.25).
        stride: spatial subsampling s of keys and values (default 2).
    """

    def __init__(
        self,
        channels: int,
        *,
        channel_ratio: float = 0.25,
        stride: int = 2,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if not isinstance(channel_ratio, (int, float)) or not 0.0 < channel_ratio <= 1.0:
            raise ValueError(f"autonl: channel_ratio must be in (0, 1], got {channel_ratio!r}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"autonl: stride must be a positive int, got {stride!r}")
        dd = factory_kwargs(device, dtype)
        # int() as the official code, at least one channel.
        self.qk_channels = max(1, int(channel_ratio * channels))
        self.stride = stride
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False, **dd)
        self.norm = nn.BatchNorm2d(channels, **dd)
        nn.init.zeros_(self.norm.weight)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = lightnl_affinity(x, self.qk_channels, self.stride)
        return x + self.norm(self.dwconv(y))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, qk_channels={self.qk_channels}, stride={self.stride}"
