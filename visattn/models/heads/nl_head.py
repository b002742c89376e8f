"""Non-local head (mmsegmentation's ``NLHead``): an embedded-Gaussian non-local block (mmcv's
``NonLocal2d`` layout, ``use_scale=True``) between the two convs of an FCN head."""

from __future__ import annotations

from ...attn.dnl import NonLocal2d
from .fcn import FCNAttnHead

__all__ = ["NLHead"]


class NLHead(FCNAttnHead):
    """``NLHead(in_channels, channels=512, reduction=2, use_scale=True)`` as in mmseg's config.

    ``nl_block`` has mmcv's ``NonLocal2d`` layout (a bias-free ``conv_out`` followed by BN), which the
    registry's ``nonlocal`` block (the paper's layout, with a biased output conv) does not share.

    Args:
        in_channels: channels of the input feature.
        channels: head width (mmseg: 512).
        num_classes: number of classes.
        reduction: non-local inter channels = channels // reduction (mmseg: 2).
        use_scale: scale the logits by 1/sqrt(inter channels) (mmseg: True).
        **kwargs: :class:`FCNHead` options.
    """

    block_attr = "nl_block"

    def __init__(
        self,
        in_channels: int,
        channels: int = 512,
        num_classes: int = 19,
        *,
        reduction: int = 2,
        use_scale: bool = True,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        block = NonLocal2d(channels, reduction=reduction, use_scale=use_scale, device=device, dtype=dtype)
        super().__init__(in_channels, channels, num_classes, block, device=device, dtype=dtype, **kwargs)
