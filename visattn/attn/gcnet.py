"""GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond — https://arxiv.org/abs/1904.11492

Native 2D: one query-independent attention map pools a global context vector, a LayerNorm
bottleneck transforms it, and it is broadcast-added to every pixel.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import make_divisible

from ..layers import AttnBlock, factory_kwargs
from ..layers.fused_backward import use_fused_backward
from ..registry import register_attn


class _ContextPool(torch.autograd.Function):
    """Attention pooling ``context = x · softmax(w ⋆ x + b)`` with a backward that touches x twice.

    Plain autograd gives x three full-size gradients (the residual's, the pooling's outer product and the
    1x1 logits conv's) and sums them with two more full-size adds. Here the function also returns ``x``
    itself (an alias the caller adds the transform to), so its backward receives the residual gradient
    too and writes x's whole gradient in one batched rank-2 update: ``g + [g_ctx, w] @ [p; g_logits]``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        bsz, channels, height, width = x.shape
        # The same ops as the reference path, so the forward values are bit-identical.
        logits = F.conv2d(x, weight, bias)
        p = logits.reshape(bsz, height * width, 1).softmax(dim=1)
        xf = x.reshape(bsz, channels, height * width)
        context = torch.bmm(xf, p)  # (B, C, 1)
        # xf is x itself unless x had to be copied (channels-last), as in the reference path.
        ctx.save_for_backward(x, xf, weight, bias, p)
        ctx.hw = (height, width)
        ctx.set_materialize_grads(False)
        return context, x.view_as(x)

    @staticmethod
    def backward(ctx, g_ctx: torch.Tensor | None, g_x: torch.Tensor | None):
        x, xf, weight, bias, p = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        bsz, channels, n = xf.shape
        if torch.is_grad_enabled():
            # create_graph: p (and a copied xf) were made inside forward, out of the graph; rebuild them from
            # the inputs so that higher derivatives see their dependence on x, w and b.
            xf = x.reshape(bsz, channels, n)
            p = F.conv2d(x, weight, bias).reshape(bsz, n, 1).softmax(dim=1)
        grad_x = grad_w = grad_b = None
        if g_ctx is None:
            # Only the alias was used: x's gradient is the residual's.
            if need_x and g_x is not None:
                grad_x = g_x
            return grad_x, grad_w, grad_b
        # The gradients of the softmax and the logits with the kernels plain autograd uses (the bias's
        # gradient is zero up to rounding, softmax being shift-invariant: this keeps that rounding).
        g_p = torch.bmm(xf.transpose(1, 2), g_ctx)  # (B, N, 1)
        g_logits = torch.ops.aten._softmax_backward_data(g_p, p, 1, p.dtype)
        if need_w:
            grad_w = torch.bmm(xf, g_logits).sum(0).view_as(weight)
        if need_b and bias is not None:
            grad_b = g_logits.sum().reshape(1)
        if need_x:
            left = torch.cat([g_ctx, weight.reshape(1, channels, 1).expand(bsz, -1, -1)], dim=2)
            right = torch.cat([p, g_logits], dim=2).transpose(1, 2)  # (B, 2, N)
            if g_x is None:
                grad_x = torch.bmm(left, right)
            else:
                grad_x = torch.baddbmm(g_x.reshape(bsz, channels, n), left, right)
            grad_x = grad_x.view(bsz, channels, *ctx.hw)
        return grad_x, grad_w, grad_b


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
        if use_fused_backward(x, self.attn_logits.weight):
            context, x = _ContextPool.apply(x, self.attn_logits.weight, self.attn_logits.bias)
        else:
            weights = rearrange(self.attn_logits(x), "b 1 h w -> b (h w) 1").softmax(dim=1)
            context = torch.bmm(rearrange(x, "b c h w -> b c (h w)"), weights)  # (B, C, 1)
        return x + self.transform(context.unsqueeze(-1))
