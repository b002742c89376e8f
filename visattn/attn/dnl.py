"""Disentangled Non-Local Neural Networks — https://arxiv.org/abs/2006.06668

Native 2D: the non-local attention softmax(θᵀφ) is split into a whitened pairwise term, softmax over
keys of (θ - mean θ)ᵀ(φ - mean φ) / τ with means over the pixels of the map, and a unary term, one
softmax saliency map over pixels that pools g(x) into a vector added to every pixel.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import ConvNormAct

from ..layers import AttnBlock, factory_kwargs
from ..registry import register_attn

__all__ = ["DisentangledNonLocal", "NonLocal2d"]


class NonLocal2d(nn.Module):
    """Embedded-Gaussian non-local block in mmcv's ``NonLocal2d`` layout: ``x + conv_out(attn(x))``.

    ``g``, ``theta`` and ``phi`` are 1x1 convs with bias, ``conv_out`` a 1x1 conv without bias and a
    BatchNorm (the ``conv``/``bn`` names of mmcv's ``ConvModule``), so mmsegmentation's ``NLHead`` keys
    load by name. Initialisation as mmcv: N(0, 0.01) projections and a zero BN scale (identity at init).

    Args:
        channels: input channels C.
        reduction: inter channels ``max(C // reduction, 1)`` (mmseg: 2).
        use_scale: divide the logits by sqrt(inter channels) (mmseg: True).
    """

    def __init__(
        self, channels: int, *, reduction: int = 2, use_scale: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        dd = factory_kwargs(device, dtype)
        inter = max(channels // reduction, 1)
        self.inter_channels = inter
        self.use_scale = use_scale

        def project() -> ConvNormAct:
            return ConvNormAct(channels, inter, 1, bias=True, apply_norm=False, apply_act=False, **dd)

        self.g = project()
        self.theta = project()
        self.phi = project()
        self.conv_out = ConvNormAct(inter, channels, 1, apply_act=False, **dd)
        for proj in (self.g, self.theta, self.phi):
            nn.init.normal_(proj.conv.weight, std=0.01)
            nn.init.zeros_(proj.conv.bias)
        nn.init.zeros_(self.conv_out.bn.weight)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # (B, 1, N, d), one head; contiguous because SDPA's fused GPU kernels need a unit last-dim stride
        # (a channels-first view falls back to the math kernel, which materialises N x N).
        return tuple(
            rearrange(p(x), "b c h w -> b 1 (h w) c").contiguous() for p in (self.theta, self.phi, self.g)
        )

    def _scale(self) -> float:
        return self.inter_channels**-0.5 if self.use_scale else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, scale=self._scale())
        y = rearrange(y, "b 1 (h w) c -> b c h w", h=x.shape[-2])
        return x + self.conv_out(y)


@register_attn(
    "dnl",
    title="Disentangled Non-Local Neural Networks",
    arxiv="2006.06668",
    year=2020,
    family="nonlocal",
    complexity="O(N²·D)",
    flops_exponent=2.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="non-local attention split into a whitened pairwise term and a unary saliency term",
    reference="https://github.com/yinmh17/DNL-Semantic-Segmentation",
)
class DisentangledNonLocal(AttnBlock):
    """Disentangled non-local block: ``x + BN(W_z · (softmax((θ-μθ)ᵀ(φ-μφ) / (τ·√d)) g + softmax(m) g))``.

    Whitening (subtracting the per-map means of θ and φ over pixels) leaves the pairwise term with the
    relation between pixels only; the pixel-independent part moves to the unary term, a 1x1 conv
    ``conv_mask`` whose softmax over pixels pools ``g(x)`` into one vector added to every pixel. The
    BN scale after ``conv_out`` starts at zero (identity at initialisation). Submodule names follow
    mmsegmentation's ``DisentangledNonLocal2d`` (``g``, ``theta``, ``phi``, ``conv_out``, ``conv_mask``),
    whose keys load unchanged.

    Args:
        channels: input channels C.
        reduction: inter channels d = max(C // reduction, 1) (paper and mmseg: 2).
        use_scale: divide the pairwise logits by sqrt(d) (mmseg: True).
        temperature: softmax temperature τ of the pairwise term (paper and mmseg: 0.05).
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 2,
        use_scale: bool = True,
        temperature: float = 0.05,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"dnl: reduction must be a positive int, got {reduction!r}")
        if not float(temperature) > 0.0:
            raise ValueError(f"dnl: temperature must be > 0, got {temperature!r}")
        dd = factory_kwargs(device, dtype)
        nl = NonLocal2d(channels, reduction=reduction, use_scale=use_scale, **dd)
        self.inter_channels = nl.inter_channels
        self.use_scale = bool(use_scale)
        self.temperature = float(temperature)
        self.g, self.theta, self.phi, self.conv_out = nl.g, nl.theta, nl.phi, nl.conv_out
        self.conv_mask = nn.Conv2d(channels, 1, 1, **dd)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-2]
        q, k, v = (
            rearrange(p(x), "b c h w -> b 1 (h w) c").contiguous() for p in (self.theta, self.phi, self.g)
        )
        # Whitening: means over the pixels of each map (per sample, so batch-independent).
        q = (q - q.mean(dim=2, keepdim=True)).contiguous()  # contiguous: see NonLocal2d._qkv
        k = (k - k.mean(dim=2, keepdim=True)).contiguous()
        scale = (self.inter_channels**-0.5 if self.use_scale else 1.0) / self.temperature
        pairwise = F.scaled_dot_product_attention(q, k, v, scale=scale)
        mask = rearrange(self.conv_mask(x), "b 1 h w -> b 1 1 (h w)").softmax(dim=-1)
        unary = mask @ v  # (B, 1, 1, d): one pooled vector per map
        y = rearrange(pairwise + unary, "b 1 (h w) c -> b c h w", h=h)
        return x + self.conv_out(y)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, inter_channels={self.inter_channels}, temperature={self.temperature}"
        )
