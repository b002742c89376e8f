"""GCNet head (mmsegmentation's ``GCHead``): a global context block between the two convs of an FCN head."""

from __future__ import annotations

from ...attn.gcnet import GlobalContextBlock
from .fcn import FCNAttnHead

__all__ = ["GCHead"]


class GCHead(FCNAttnHead):
    """``GCHead(in_channels, channels=512, ratio=1/4)``: attention pooling, channel-add fusion (mmseg).

    ``gc_block`` is visattn's ``gcnet`` block with reduction ``round(1 / ratio)``; its ``attn_logits`` and
    ``transform`` are mmcv's ``conv_mask`` and ``channel_add_conv`` (``convert_mmseg`` renames them). Its
    bottleneck width is ``make_divisible(channels * ratio, 8)``, mmcv's ``int(channels * ratio)`` for
    every width that is a multiple of 8 (128 for the zoo's 512 channels and ratio 1/4).

    Args:
        in_channels: channels of the input feature.
        channels: head width (mmseg: 512).
        num_classes: number of classes.
        ratio: bottleneck ratio of the context transform (mmseg: 1/4).
        **kwargs: :class:`FCNHead` options.
    """

    block_attr = "gc_block"

    def __init__(
        self,
        in_channels: int,
        channels: int = 512,
        num_classes: int = 19,
        *,
        ratio: float = 0.25,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"GCHead: ratio must be in (0, 1], got {ratio!r}")
        block = GlobalContextBlock(channels, reduction=round(1.0 / ratio), device=device, dtype=dtype)
        super().__init__(in_channels, channels, num_classes, block, device=device, dtype=dtype, **kwargs)
