"""ViT backbones for segmentation: timm's ViT (dense or any visattn mixer) as a multi-level feature
extractor with ViTDet's simple feature pyramid as the neck.

The ViT gives token maps at its patch stride from chosen blocks through timm's ``forward_intermediates``
(prefix tokens dropped; ``dynamic_img_size=True``, so any input size works, the mixers seeing each
forward's patch grid). Each requested level is one branch of the simple feature pyramid of ViTDet (Li et
al., "Exploring Plain Vision Transformer Backbones for Object Detection", arXiv 2203.16527): stride-2
transposed convolutions (LayerNorm and GELU between them, channels halved at each) to go finer than the
patch stride, max pooling to go coarser, then a 1x1 and a 3x3 convolution without bias, each followed by
a LayerNorm. ViTDet takes every level from the last block; a level may also come from an earlier block
(SETR's auxiliary heads read middle blocks), which is how the segmentor feeds its auxiliary head.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models._features import FeatureInfo

__all__ = ["NECK_DEFAULTS", "ViTFeatures", "build_vit_backbone", "pyramid_level"]

# The segmentor config's ``neck_kwargs``: the pyramid's width (ViTDet: 256) and the blocks that feed the
# decode head and the auxiliary head (None: the last block, and the last block of the first half).
NECK_DEFAULTS: dict[str, Any] = {"channels": 256, "decode_block": None, "aux_block": None}


def _valid_strides(patch: int) -> list[int]:
    finer = [patch >> k for k in (3, 2, 1) if patch % (1 << k) == 0]
    return [*finer, patch, patch * 2, patch * 4]


def pyramid_level(dim: int, patch: int, stride: int, channels: int) -> nn.Sequential:
    """One branch of ViTDet's simple feature pyramid: a (B, dim, H/patch, W/patch) token map to a
    (B, channels, H/stride, W/stride) map. ``patch / stride`` (finer) or ``stride / patch`` (coarser) must
    be a power of two."""
    ratio = patch / stride if stride <= patch else stride / patch
    steps = round(math.log2(ratio))
    if 2**steps != ratio:
        raise ValueError(
            f"ViT feature pyramid: stride {stride} is not a power-of-two multiple or fraction of the patch "
            f"size {patch}; choose a stride among {_valid_strides(patch)} "
            "(or None for the patch stride)"
        )
    layers: list[nn.Module] = []
    width = dim
    if stride < patch:
        for i in range(steps):
            out = max(width // 2, 1)
            layers.append(nn.ConvTranspose2d(width, out, kernel_size=2, stride=2))
            if i < steps - 1:
                layers += [LayerNorm2d(out), nn.GELU()]
            width = out
    elif stride > patch:
        layers.append(nn.MaxPool2d(kernel_size=2**steps, stride=2**steps))
    layers += [
        nn.Conv2d(width, channels, kernel_size=1, bias=False),
        LayerNorm2d(channels),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(channels),
    ]
    return nn.Sequential(*layers)


class ViTFeatures(nn.Module):
    """A timm ``VisionTransformer`` as a feature extractor: ``forward(images)`` returns one (B, channels,
    H/stride, W/stride) map per level, in the order given.

    Args:
        vit: a timm ViT (``forward_intermediates``), e.g. from :func:`visattn.create_model`, built with
            ``dynamic_img_size=True`` for inputs of any size. Blocks after the last one read, the final
            norm and the classifier are pruned (timm's ``prune_intermediate_layers``), so every parameter
            takes part in the loss.
        levels: ``(block index, stride)`` per output; negative indices count from the last block; strides
            are powers of two times (or fractions of) the patch size, non-decreasing.
        channels: width of every level (ViTDet: 256).
    """

    def __init__(self, vit: nn.Module, levels: Sequence[tuple[int, int]], channels: int = 256) -> None:
        super().__init__()
        if not hasattr(vit, "forward_intermediates") or not hasattr(vit, "blocks"):
            raise ValueError(
                f"ViTFeatures: {type(vit).__name__} is not a timm VisionTransformer (no forward_intermediates)"
            )
        if not levels:
            raise ValueError("ViTFeatures: levels must name at least one (block index, stride)")
        depth = len(vit.blocks)
        patch = vit.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f"ViTFeatures: square patches are needed for the pyramid, got {tuple(patch)}")
        blocks = []
        for index, _ in levels:
            if not -depth <= index < depth:
                raise ValueError(
                    f"ViTFeatures: block index {index} is outside the ViT's {depth} blocks "
                    f"(valid: {-depth} .. {depth - 1})"
                )
            blocks.append(index % depth)
        strides = [int(s) for _, s in levels]
        if strides != sorted(strides):
            raise ValueError(f"ViTFeatures: level strides must not decrease, got {strides}")
        # The distinct blocks read, in order; each level points into them.
        self.take = sorted(set(blocks))
        self.level_block = [self.take.index(b) for b in blocks]
        vit.prune_intermediate_layers(self.take, prune_norm=True, prune_head=True)
        self.vit = vit
        self.patch_size = int(patch[0])
        dim = int(vit.embed_dim)
        self.neck = nn.ModuleList(pyramid_level(dim, self.patch_size, s, channels) for s in strides)
        self.feature_info = FeatureInfo(
            [
                {"num_chs": channels, "reduction": s, "module": f"neck.{i}", "block": b}
                for i, (s, b) in enumerate(zip(strides, blocks))
            ],
            out_indices=tuple(range(len(strides))),
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = self.vit.forward_intermediates(
            images, indices=self.take, output_fmt="NCHW", intermediates_only=True
        )
        h, w = images.shape[-2:]
        out = []
        for branch, j, info in zip(self.neck, self.level_block, self.feature_info.info):
            level, stride = branch(maps[j]), info["reduction"]
            # With patch padding the map also covers the padded border: keep the cells over real pixels.
            out.append(level[..., : -(-h // stride), : -(-w // stride)])
        return out


def build_vit_backbone(
    backbone: str,
    attn: str | None,
    *,
    attn_kwargs: Mapping[str, Any] | None = None,
    pretrained: bool = False,
    timm_kwargs: Mapping[str, Any] | None = None,
    neck_kwargs: Mapping[str, Any] | None = None,
    output_stride: int | None = 8,
    aux: bool = True,
) -> ViTFeatures:
    """The segmentor's ViT backbone (config keys in the messages): :func:`visattn.create_model`'s ViT with
    mixer ``attn`` (None: timm's dense attention), ``pretrained`` timm weights, and a simple-pyramid level
    at ``output_stride`` (None: the patch stride) from ``neck_kwargs['decode_block']`` for the decode head,
    plus one from ``neck_kwargs['aux_block']`` for the auxiliary head when ``aux``."""
    from .backbones import create_model

    neck = {**NECK_DEFAULTS, **(neck_kwargs or {})}
    unknown = sorted(set(neck) - set(NECK_DEFAULTS))
    if unknown:
        raise ValueError(
            f"config key 'neck_kwargs' has unknown keys {unknown}; it takes {sorted(NECK_DEFAULTS)}"
        )
    kwargs = dict(timm_kwargs or {})
    for key in ("features_only", "out_indices", "output_stride"):
        if key in kwargs:
            raise ValueError(
                f"config key 'backbone_kwargs.{key}' does not apply to the ViT {backbone}: its features come "
                "through forward_intermediates and the pyramid neck; set 'output_stride' and "
                "'neck_kwargs' (decode_block, aux_block, channels) instead"
            )
    # Training crops, test images and sliding windows all differ from the pretraining size.
    kwargs.setdefault("dynamic_img_size", True)
    # Sizes that are no multiple of the patch (test images, crops): pad right/bottom to whole patches.
    kwargs.setdefault("dynamic_img_pad", True)
    kwargs.setdefault("num_classes", 0)
    vit = create_model(
        backbone,
        attn,
        attn_kwargs=dict(attn_kwargs) if attn_kwargs else None,
        pretrained=pretrained,
        **kwargs,
    )
    depth = len(vit.blocks)
    patch = int(vit.patch_embed.patch_size[0])
    stride = patch if output_stride is None else int(output_stride)
    decode = -1 if neck["decode_block"] is None else neck["decode_block"]
    aux_block = depth // 2 - 1 if neck["aux_block"] is None else neck["aux_block"]
    for key, index in (("decode_block", decode), ("aux_block", aux_block)):
        if isinstance(index, bool) or not isinstance(index, int) or not -depth <= index < depth:
            raise ValueError(
                f"config key 'neck_kwargs.{key}' must be a block index of {backbone}'s {depth} blocks "
                f"({-depth} .. {depth - 1}), got {index!r}"
            )
    channels = neck["channels"]
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"config key 'neck_kwargs.channels' must be a positive int, got {channels!r}")
    levels = [(aux_block, stride), (decode, stride)] if aux else [(decode, stride)]
    try:
        return ViTFeatures(vit, levels, channels=channels)
    except ValueError as err:
        raise ValueError(
            f"config key 'output_stride' ({output_stride}) for the ViT {backbone}: {err}"
        ) from err
