"""EMANet head (mmsegmentation's ``EMAHead``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct

from ...attn.emanet import EMAModule
from ...layers import factory_kwargs
from .common import DecodeHead, conv_bn_relu

__all__ = ["EMAHead"]


class EMAHead(DecodeHead):
    """``EMAHead(in_channels, channels=256, ema_channels=512, num_bases=64, num_stages=3, momentum=0.1)``.

    mmseg's forward: ``f = ema_in_conv(x)``; ``r = ema_module(ema_mid_conv(f))`` (no gradient: bases and
    responsibilities are computed under ``no_grad``, and ``ema_mid_conv`` is frozen);
    ``y = relu(f + ema_out_conv(relu(r)))``; ``conv_cat(cat[x, bottleneck(y)])``; dropout; ``conv_seg``.
    The EM itself is visattn's ``EMAModule`` (the ``emanet`` block's), whose ``bases`` buffer is mmseg's;
    every key loads by name.

    Args:
        in_channels: channels of the input feature.
        channels: width of ``bottleneck`` / ``conv_cat`` (mmseg: 256).
        num_classes: number of classes.
        ema_channels: width of the EM features (mmseg: 512).
        num_bases: K (mmseg: 64).
        num_stages: EM iterations T (mmseg: 3).
        momentum: moving-average weight of the batch bases in training (mmseg: 0.1).
        concat_input: fuse the input by ``conv_cat`` (mmseg: True).
        dropout: dropout before ``conv_seg``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 256,
        num_classes: int = 19,
        *,
        ema_channels: int = 512,
        num_bases: int = 64,
        num_stages: int = 3,
        momentum: float = 0.1,
        concat_input: bool = True,
        dropout: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_channels, channels, num_classes, dropout=dropout, device=device, dtype=dtype)
        dd = factory_kwargs(device, dtype)
        self.ema_module = EMAModule(ema_channels, num_bases, num_stages, float(momentum), **dd)
        self.ema_in_conv = conv_bn_relu(in_channels, ema_channels, 3, **dd)
        # Projects the non-negative ReLU output to signed features for the EM; frozen, as in mmseg.
        self.ema_mid_conv = ConvNormAct(
            ema_channels, ema_channels, 1, bias=True, apply_norm=False, apply_act=False, **dd
        )
        self.ema_mid_conv.requires_grad_(False)
        self.ema_out_conv = conv_bn_relu(ema_channels, ema_channels, 1, act=False, **dd)
        self.bottleneck = conv_bn_relu(ema_channels, channels, 3, **dd)
        self.concat_input = bool(concat_input)
        if self.concat_input:
            self.conv_cat = conv_bn_relu(in_channels + channels, channels, 3, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.ema_in_conv(x)
        with torch.no_grad():
            recon = self.ema_module(self.ema_mid_conv(feats))
        out = F.relu(feats + self.ema_out_conv(F.relu(recon)))
        out = self.bottleneck(out)
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return self.cls_seg(out)
