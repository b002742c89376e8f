"""Dual Attention Network for Scene Segmentation — https://arxiv.org/abs/1809.02983

Native 2D: a position attention module (every pixel attends to every pixel, softmax(qᵀk) v with
C/8-wide queries and keys) and a channel attention module (every channel attends to every channel,
by the similarity of their H·W maps) run in parallel; each is added to the input through a
zero-initialised scale γ.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import AttnBlock, factory_kwargs
from ..registry import register_attn

__all__ = ["ChannelAttention", "DANet", "PositionAttention", "channel_attention"]


def channel_attention(x: torch.Tensor) -> torch.Tensor:
    """DANet's channel attention on a (B, C, H, W) map (no residual): softmax over channels of
    ``max(E) - E`` with ``E = X Xᵀ`` (X the C x N flattened map), applied to X.

    ``max(E) - E`` is the paper's code (mmseg's ``CAM``): the same softmax as ``-E`` up to rounding, so
    a channel attends most to the channels least similar to it. The map is C x C (never N x N).
    """
    flat = x.flatten(2)
    energy = flat @ flat.transpose(1, 2)
    attention = (energy.amax(dim=-1, keepdim=True) - energy).softmax(dim=-1)
    return (attention @ flat).view_as(x)


class PositionAttention(nn.Module):
    """DANet's position attention module (mmseg's ``PAM``): ``x + γ · softmax(qᵀk) v``.

    1x1 convs with bias project queries and keys to ``qk_channels`` and values to C; the logits are not
    scaled (as in the paper). γ starts at zero. Keys load from mmseg's ``pam.*`` (its ``gamma.scale``,
    shape (), is this module's ``gamma``, shape (1,)).

    Args:
        channels: channels C of the map.
        qk_channels: query/key channels (paper: C / 8; mmseg's ``pam_channels`` = 64 for C = 512).
    """

    def __init__(self, channels: int, qk_channels: int, *, device=None, dtype=None) -> None:
        super().__init__()
        dd = factory_kwargs(device, dtype)
        self.key_project = nn.Conv2d(channels, qk_channels, 1, **dd)
        self.query_project = nn.Conv2d(channels, qk_channels, 1, **dd)
        self.value_project = nn.Conv2d(channels, channels, 1, **dd)
        self.gamma = nn.Parameter(torch.zeros(1, **dd))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention output alone (no residual, no γ)."""
        q, k, v = (
            # contiguous: SDPA's fused GPU kernels need a unit last-dim stride (else N x N in memory)
            rearrange(p(x), "b c h w -> b 1 (h w) c").contiguous()
            for p in (self.query_project, self.key_project, self.value_project)
        )
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return rearrange(out, "b 1 (h w) c -> b c h w", h=x.shape[-2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * self.attend(x) + x


class ChannelAttention(nn.Module):
    """DANet's channel attention module (mmseg's ``CAM``): ``x + γ · channel_attention(x)``, γ from zero."""

    def __init__(self, *, device=None, dtype=None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, **factory_kwargs(device, dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gamma * channel_attention(x) + x


@register_attn(
    "danet",
    title="Dual Attention Network for Scene Segmentation",
    arxiv="1809.02983",
    year=2019,
    family="nonlocal",
    complexity="O(N²·D + N·C²)",
    flops_exponent=2.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="position attention over pixels and channel attention over channels, summed, each with a zero γ",
    reference="https://github.com/junfu1115/DANet",
)
class DANet(AttnBlock):
    """Position and channel attention in parallel: ``x + γ_p · PAM(x) + γ_c · CAM(x)``.

    The paper runs the two modules on two branches of the head (each after its own 3x3 conv) and sums
    the branches; as one block they share the input, and the sum of their residual forms is one
    residual. Both γ start at zero, so the block is the identity at initialisation.

    Args:
        channels: input channels C.
        reduction: query/key width of the position attention, C // reduction (paper: 8).
    """

    def __init__(self, channels: int, *, reduction: int = 8, device=None, dtype=None) -> None:
        super().__init__(channels)
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"danet: reduction must be a positive int, got {reduction!r}")
        dd = factory_kwargs(device, dtype)
        self.pam = PositionAttention(channels, max(1, channels // reduction), **dd)
        self.cam = ChannelAttention(**dd)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pam.gamma * self.pam.attend(x) + self.cam.gamma * channel_attention(x)
