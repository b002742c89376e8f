"""DNL head (mmsegmentation's ``DNLHead``): a disentangled non-local block between the two convs of an
FCN head."""

from __future__ import annotations

from ...attn.dnl import DisentangledNonLocal
from .fcn import FCNAttnHead

__all__ = ["DNLHead"]


class DNLHead(FCNAttnHead):
    """``DNLHead(in_channels, channels=512, reduction=2, use_scale=True, temperature=0.05)`` (mmseg's config).

    ``dnl_block`` is visattn's ``dnl`` block, whose submodule names are mmseg's.

    Args:
        in_channels: channels of the input feature.
        channels: head width (mmseg: 512).
        num_classes: number of classes.
        reduction: inter channels = channels // reduction (mmseg: 2).
        use_scale: scale the pairwise logits by 1/sqrt(inter channels) (mmseg: True).
        temperature: pairwise softmax temperature (mmseg: 0.05).
        **kwargs: :class:`FCNHead` options.
    """

    block_attr = "dnl_block"

    def __init__(
        self,
        in_channels: int,
        channels: int = 512,
        num_classes: int = 19,
        *,
        reduction: int = 2,
        use_scale: bool = True,
        temperature: float = 0.05,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        block = DisentangledNonLocal(
            channels,
            reduction=reduction,
            use_scale=use_scale,
            temperature=temperature,
            device=device,
            dtype=dtype,
        )
        super().__init__(in_channels, channels, num_classes, block, device=device, dtype=dtype, **kwargs)
