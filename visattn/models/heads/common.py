"""Pieces every decode head shares: mmcv's conv-BN-ReLU ``ConvModule`` and the classifier of
mmsegmentation's ``BaseDecodeHead`` (dropout 0.1, then a 1x1 conv ``conv_seg``).

timm's ``ConvNormAct`` has mmcv's ``ConvModule`` layout: a bias-free ``conv``, a BatchNorm ``bn`` with
mmcv's eps 1e-5 and momentum 0.1, and a ReLU, so mmseg's ``*.conv.weight`` / ``*.bn.*`` keys load by name.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import ConvNormAct

from ...layers import factory_kwargs

__all__ = ["DecodeHead", "conv_bn_relu"]


def conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    *,
    dilation: int = 1,
    act: bool = True,
    device=None,
    dtype=None,
) -> ConvNormAct:
    """mmcv ``ConvModule(in, out, k, padding=(k // 2) * dilation, dilation, norm_cfg=BN, act_cfg=ReLU)``.

    Initialised like ``ConvModule.init_weights``: Kaiming-normal (fan_out, ReLU) conv, unit BN scale.
    """
    module = ConvNormAct(
        in_channels,
        out_channels,
        kernel_size,
        padding=(kernel_size // 2) * dilation,
        dilation=dilation,
        apply_act=act,
        **factory_kwargs(device, dtype),
    )
    nn.init.kaiming_normal_(module.conv.weight, mode="fan_out", nonlinearity="relu")
    return module


class DecodeHead(nn.Module):
    """Base of the heads: ``cls_seg`` is mmseg's ``BaseDecodeHead.cls_seg`` (Dropout2d, ``conv_seg``).

    A head maps the backbone feature it reads to class logits at that feature's resolution;
    :meth:`forward_train` returns the named logits the training losses need (``{"out": ...}`` plus, for
    DANet, its branch logits), each with its weight in :attr:`loss_weights`.

    Args:
        in_channels: channels of the backbone feature the head reads.
        channels: channels of the head's last feature map (input of ``conv_seg``).
        num_classes: number of classes.
        dropout: Dropout2d probability before ``conv_seg`` (mmseg: 0.1; 0 disables it).
    """

    loss_weights: dict[str, float] = {"out": 1.0}

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        *,
        dropout: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("channels", channels),
            ("num_classes", num_classes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {value!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout!r}")
        self.in_channels = in_channels
        self.channels = channels
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else None
        self.conv_seg = self._classifier(channels, **factory_kwargs(device, dtype))

    def _classifier(self, channels: int, **dd) -> nn.Conv2d:
        # mmseg's init_cfg for conv_seg: N(0, 0.01), zero bias.
        conv = nn.Conv2d(channels, self.num_classes, 1, **dd)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        return conv

    def cls_seg(self, feat: torch.Tensor, conv_seg: nn.Module | None = None) -> torch.Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return (self.conv_seg if conv_seg is None else conv_seg)(feat)

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self(x)}

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channels={self.channels}, num_classes={self.num_classes}"
