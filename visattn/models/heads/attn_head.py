"""A head for any registry block: the FCN-shaped structure of mmsegmentation's CC/GC/NL heads
(conv-in, attention, conv-out, concat with the input, classifier) around ``create_attn(attn, channels)``."""

from __future__ import annotations

from typing import Any

from ...registry import create_attn
from .fcn import FCNAttnHead

__all__ = ["AttnHead"]


class AttnHead(FCNAttnHead):
    """``cls_seg(conv_cat(cat[x, conv_out(attn(conv_in(x)))]))`` with ``attn`` any visattn block.

    ``convs.0`` (3x3 conv-BN-ReLU, in_channels -> channels) and ``convs.1`` (3x3, channels -> channels)
    surround the block, as in CCHead / GCHead / NLHead, so heads differ only in their attention.

    Args:
        in_channels: channels of the input feature.
        channels: head width (the block's channels).
        num_classes: number of classes.
        attn: a registry name (``visattn.list_attns()``).
        attn_kwargs: keyword hyperparameters of the block.
        **kwargs: :class:`FCNHead` options (``concat_input``, ``dropout``, ``kernel_size``).
    """

    block_attr = "attn"

    def __init__(
        self,
        in_channels: int,
        channels: int = 512,
        num_classes: int = 19,
        *,
        attn: str,
        attn_kwargs: dict[str, Any] | None = None,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        block = create_attn(attn, channels, **(attn_kwargs or {}), device=device, dtype=dtype)
        super().__init__(in_channels, channels, num_classes, block, device=device, dtype=dtype, **kwargs)
        self.attn_name = attn
