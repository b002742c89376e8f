"""DANet head (mmsegmentation's ``DAHead``): a position-attention and a channel-attention branch."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...attn.danet import ChannelAttention, PositionAttention
from ...layers import factory_kwargs
from .common import DecodeHead, conv_bn_relu

__all__ = ["DAHead"]


class DAHead(DecodeHead):
    """``DAHead(in_channels, channels=512, pam_channels=64)``.

    Two branches on the input: ``pam_out_conv(pam(pam_in_conv(x)))`` and
    ``cam_out_conv(cam(cam_in_conv(x)))`` (3x3 conv-BN-ReLU around each module); the logits are
    ``conv_seg`` of their sum. In training each branch also has its own classifier (``pam_conv_seg``,
    ``cam_conv_seg``, after the shared dropout), and the three losses have weight 1 (mmseg); inference
    uses the sum only. mmseg's ``pam.gamma.scale`` / ``cam.gamma.scale`` (shape ()) are ``pam.gamma`` /
    ``cam.gamma`` (shape (1,)) here.

    Args:
        in_channels: channels of the input feature.
        channels: head width (mmseg: 512).
        num_classes: number of classes.
        pam_channels: query/key channels of the position attention (mmseg: 64).
        dropout: dropout before the classifiers.
    """

    loss_weights = {"out": 1.0, "pam": 1.0, "cam": 1.0}

    def __init__(
        self,
        in_channels: int,
        channels: int = 512,
        num_classes: int = 19,
        *,
        pam_channels: int = 64,
        dropout: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_channels, channels, num_classes, dropout=dropout, device=device, dtype=dtype)
        dd = factory_kwargs(device, dtype)
        self.pam_in_conv = conv_bn_relu(in_channels, channels, 3, **dd)
        self.pam = PositionAttention(channels, pam_channels, **dd)
        self.pam_out_conv = conv_bn_relu(channels, channels, 3, **dd)
        self.pam_conv_seg: nn.Conv2d = self._classifier(channels, **dd)
        self.cam_in_conv = conv_bn_relu(in_channels, channels, 3, **dd)
        self.cam = ChannelAttention(**dd)
        self.cam_out_conv = conv_bn_relu(channels, channels, 3, **dd)
        self.cam_conv_seg: nn.Conv2d = self._classifier(channels, **dd)

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pam = self.pam_out_conv(self.pam(self.pam_in_conv(x)))
        cam = self.cam_out_conv(self.cam(self.cam_in_conv(x)))
        return pam, cam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pam, cam = self._branches(x)
        return self.cls_seg(pam + cam)

    def forward_train(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pam, cam = self._branches(x)
        return {
            "out": self.cls_seg(pam + cam),
            "pam": self.cls_seg(pam, self.pam_conv_seg),
            "cam": self.cls_seg(cam, self.cam_conv_seg),
        }
