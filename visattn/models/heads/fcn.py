"""FCN head (mmsegmentation's ``FCNHead``) and the FCN-shaped attention head its CC/GC/NL/DNL heads share.

``FCNHead``: ``num_convs`` conv-BN-ReLU layers, then, with ``concat_input``, ``conv_cat`` on
``cat([input, features])``, then dropout and ``conv_seg``. The attention heads of CCNet, GCNet,
Non-local and DNL are FCN heads with two convs and their block between them:
``conv_cat(cat[x, convs[1](block(convs[0](x)))])``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...layers import factory_kwargs
from .common import DecodeHead, conv_bn_relu

__all__ = ["FCNAttnHead", "FCNHead"]


class FCNHead(DecodeHead):
    """Fully convolutional head, layout and defaults of mmseg's ``FCNHead``.

    Args:
        in_channels: channels of the input feature.
        channels: width of the convs.
        num_classes: number of classes.
        num_convs: number of conv-BN-ReLU layers (mmseg: 2 for the decode head, 1 for the auxiliary head;
            0 makes ``convs`` the identity).
        kernel_size: kernel of the convs and of ``conv_cat``.
        concat_input: fuse the input with the conv output by ``conv_cat`` (mmseg: True; False for aux).
        dilation: dilation of the convs.
        dropout: dropout probability before ``conv_seg``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 512,
        num_classes: int = 19,
        *,
        num_convs: int = 2,
        kernel_size: int = 3,
        concat_input: bool = True,
        dilation: int = 1,
        dropout: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_channels, channels, num_classes, dropout=dropout, device=device, dtype=dtype)
        if isinstance(num_convs, bool) or not isinstance(num_convs, int) or num_convs < 0:
            raise ValueError(f"{type(self).__name__}: num_convs must be an int >= 0, got {num_convs!r}")
        if num_convs == 0 and in_channels != channels:
            raise ValueError(f"{type(self).__name__}: num_convs=0 needs in_channels == channels")
        dd = factory_kwargs(device, dtype)
        self.num_convs = num_convs
        self.concat_input = bool(concat_input)
        convs = [
            conv_bn_relu(in_channels if i == 0 else channels, channels, kernel_size, dilation=dilation, **dd)
            for i in range(num_convs)
        ]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        if self.concat_input:
            self.conv_cat = conv_bn_relu(in_channels + channels, channels, kernel_size, **dd)

    def _fuse(self, x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.conv_cat(torch.cat([x, feats], dim=1)) if self.concat_input else feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_seg(self._fuse(x, self.convs(x)))


class FCNAttnHead(FCNHead):
    """An FCN head with two convs and an attention module between them (mmseg's CC/GC/NL/DNL heads).

    Subclasses build the module and name it as mmseg does (``block_attr``); the forward is
    ``cls_seg(conv_cat(cat[x, convs[1](block(convs[0](x)))]))``.
    """

    block_attr = "attn"

    def __init__(self, in_channels: int, channels: int, num_classes: int, block: nn.Module, **kwargs) -> None:
        kwargs.setdefault("num_convs", 2)
        if kwargs["num_convs"] != 2:
            raise ValueError(
                f"{type(self).__name__}: the attention sits between exactly 2 convs (num_convs=2)"
            )
        super().__init__(in_channels, channels, num_classes, **kwargs)
        self.add_module(self.block_attr, block)

    @property
    def block(self) -> nn.Module:
        return getattr(self, self.block_attr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs[1](self.block(self.convs[0](x)))
        return self.cls_seg(self._fuse(x, out))
