"""CCNet head (mmsegmentation's ``CCHead``): criss-cross attention, ``recurrence`` times with shared
weights, between the two convs of an FCN head."""

from __future__ import annotations

from ...attn.ccnet import CrissCrossAttention
from .fcn import FCNAttnHead

__all__ = ["CCHead"]


class CCHead(FCNAttnHead):
    """``CCHead(in_channels, channels=512, recurrence=2)`` as in mmseg's CCNet configs.

    ``cca`` is visattn's ``ccnet`` block with ``recurrence`` applications, which is mmseg's loop
    ``for _ in range(recurrence): x = cca(x)``; mmseg's ``cca.gamma.scale`` (shape ()) is ``cca.gamma``
    (shape (1,)) here (``convert_mmseg`` reshapes it).

    Args:
        in_channels: channels of the input feature (2048 for ResNet-50/101).
        channels: head width (mmseg: 512).
        num_classes: number of classes.
        recurrence: applications of the criss-cross attention (mmseg: 2).
        **kwargs: :class:`FCNHead` options (``concat_input``, ``dropout``, ``device``, ``dtype``).
    """

    block_attr = "cca"

    def __init__(
        self,
        in_channels: int,
        channels: int = 512,
        num_classes: int = 19,
        *,
        recurrence: int = 2,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        block = CrissCrossAttention(channels, recurrence=recurrence, device=device, dtype=dtype)
        super().__init__(in_channels, channels, num_classes, block, device=device, dtype=dtype, **kwargs)
