"""CBAM: Convolutional Block Attention Module — https://arxiv.org/abs/1807.06521

Native 2D: a channel gate (shared MLP over avg- and max-pooled descriptors) followed by a spatial
gate (7x7 conv over the channel-wise max and mean maps), both sigmoid, applied sequentially.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import make_divisible

from ..layers import AttnBlock, factory_kwargs
from ..layers.fused_backward import use_fused_backward
from ..registry import register_attn


class _MeanMaxPool(torch.autograd.Function):
    """``(x, x.mean(dims), x.amax(dims))`` (keepdim) with one backward for all three.

    ``amax``'s own backward spends five full-size passes (equality mask, its float copy, the tie count,
    a division and a product), and autograd then adds the mean's and the gate's gradients of x one
    full-size add at a time. The function returns ``x`` itself as well (an alias the caller gates), so
    its backward sees every gradient of x and writes their sum in three full-size passes and a
    reduction: the max's float mask, its count, the gate's gradient plus the max's, plus the mean's.
    Ties share the max's gradient equally, as ``amax``'s backward does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dims: tuple[int, ...]):
        mean, peak = x.mean(dims, keepdim=True), x.amax(dims, keepdim=True)
        ctx.save_for_backward(x, peak)
        ctx.dims = dims
        ctx.set_materialize_grads(False)
        return x.view_as(x), mean, peak

    @staticmethod
    def backward(ctx, g_x: torch.Tensor | None, g_mean: torch.Tensor | None, g_peak: torch.Tensor | None):
        x, peak = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None
        grad = g_x  # incoming: never written in place
        if g_peak is not None:
            # ``x >= peak`` is ``x == peak`` when peak is the max (NaN included: both are false), and
            # written straight into a float mask it costs about a third of the bool ``==``, its float
            # copy and its integer count.
            hit = torch.ge(x, peak, out=torch.empty_like(x))
            share = g_peak / hit.sum(ctx.dims, keepdim=True)
            grad = hit.mul_(share) if grad is None else torch.addcmul(grad, hit, share)
        if g_mean is not None:
            share = g_mean / math.prod(x.shape[d] for d in ctx.dims)
            if grad is None:
                grad = share.expand_as(x).clone()
            elif grad is g_x:
                grad = grad + share
            else:
                grad.add_(share)
        return grad, None


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
        if use_fused_backward(x, self.spatial.weight):
            # The same computation with cheaper gradients for the two mean/max poolings (see _MeanMaxPool).
            x, mean, peak = _MeanMaxPool.apply(x, (2, 3))
            x = x * (self.mlp(mean) + self.mlp(peak)).sigmoid()
            x, mean, peak = _MeanMaxPool.apply(x, (1,))
            return x * self.spatial(torch.cat([peak, mean], dim=1)).sigmoid()
        channel_logits = self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))
        x = x * channel_logits.sigmoid()
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return x * self.spatial(pooled).sigmoid()
