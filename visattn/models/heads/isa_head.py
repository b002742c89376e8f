"""ISANet head (mmsegmentation's ``ISAHead``)."""

from __future__ import annotations

import torch
from einops import rearrange

from ...attn.isa import ISASelfAttention
from ...layers import factory_kwargs, pad_to_multiple, unpad
from .common import DecodeHead, conv_bn_relu

__all__ = ["ISAHead"]


class ISAHead(DecodeHead):
    """``ISAHead(in_channels, channels=512, isa_channels=256, down_factor=(8, 8))``.

    mmseg's forward: ``f = in_conv(x)``; pad ``f`` symmetrically to multiples of ``down_factor``; long-range
    attention (``global_relation``) among the pixels at the same offset of every ``down_factor`` block,
    then short-range attention (``local_relation``) within each block; crop;
    ``out_conv(cat[relation, f])``; dropout; ``conv_seg``. The relations are the ``isa`` block's
    ``ISASelfAttention`` modules; every key loads by name. (No ``concat_input``, as in mmseg.)

    Args:
        in_channels: channels of the input feature.
        channels: head width (mmseg: 512).
        num_classes: number of classes.
        isa_channels: query/key channels of both relations (mmseg: 256).
        down_factor: local group size (P_h, P_w) (mmseg: (8, 8)).
        dropout: dropout before ``conv_seg``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 512,
        num_classes: int = 19,
        *,
        isa_channels: int = 256,
        down_factor: int | tuple[int, int] = (8, 8),
        dropout: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_channels, channels, num_classes, dropout=dropout, device=device, dtype=dtype)
        dd = factory_kwargs(device, dtype)
        pair = (down_factor, down_factor) if isinstance(down_factor, int) else tuple(down_factor)
        if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
            raise ValueError(f"ISAHead: down_factor must be a positive int or pair, got {down_factor!r}")
        self.down_factor = pair
        self.in_conv = conv_bn_relu(in_channels, channels, 3, **dd)
        self.global_relation = ISASelfAttention(channels, isa_channels, **dd)
        self.local_relation = ISASelfAttention(channels, isa_channels, **dd)
        self.out_conv = conv_bn_relu(channels * 2, channels, 1, **dd)

    def relation(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.down_factor
        padded, pads = pad_to_multiple(x, self.down_factor, center=True)
        gh, gw = padded.shape[-2] // ph, padded.shape[-1] // pw
        t = rearrange(padded, "b c (gh ph) (gw pw) -> (b ph pw) c gh gw", ph=ph, pw=pw)
        t = self.global_relation(t)
        t = rearrange(t, "(b ph pw) c gh gw -> (b gh gw) c ph pw", ph=ph, pw=pw)
        t = self.local_relation(t)
        t = rearrange(t, "(b gh gw) c ph pw -> b c (gh ph) (gw pw)", gh=gh, gw=gw)
        return unpad(t, pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.in_conv(x)
        out = self.out_conv(torch.cat([self.relation(feats), feats], dim=1))
        return self.cls_seg(out)
