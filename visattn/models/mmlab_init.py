"""mmsegmentation's backbone initialisation: the open-mmlab ImageNet ResNetV1c weights.

mmseg's ``*_r50-d8`` / ``*_r101-d8`` models start training from ``open-mmlab://resnet50_v1c`` /
``open-mmlab://resnet101_v1c`` (mmcv's model zoo index ``mmcv/model_zoo/open_mmlab.json``), not from
timm's ImageNet weights. Here those files are downloaded through :func:`visattn.hub.download_checkpoint`
(torch.hub's cache, SHA-256 checked against the prefix in the file name), read with
``weights_only=True`` and mapped to timm's ``resnet50c`` / ``resnet101c`` names the way the zoo
conversion maps mmseg's backbone (:mod:`visattn.models.convert`): the deep stem ``stem.{0,1,3,4,6}`` is
``conv1.{0,1,3,4,6}``, ``stem.7`` is ``bn1``, ``layer1``-``layer4`` are equal, and the ImageNet
classifier ``fc`` is dropped (mmseg drops it too).

In a config: ``model.backbone_pretrained: open-mmlab://resnet50_v1c`` (``true`` keeps timm's weights).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "OPEN_MMLAB_BACKBONES",
    "OPEN_MMLAB_URLS",
    "PREFIX",
    "convert_open_mmlab_resnet",
    "is_open_mmlab",
    "load_open_mmlab_init",
    "open_mmlab_state_dict",
    "open_mmlab_url",
]

_logger = logging.getLogger("visattn")

PREFIX = "open-mmlab://"
# From mmcv's model zoo index (mmcv/model_zoo/open_mmlab.json); the 8 hex digits are the start of the
# file's SHA-256, checked on download and on every use of the cached file.
OPEN_MMLAB_URLS = {
    "resnet50_v1c": "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    "resnet101_v1c": "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
}
# The timm architecture each file initialises (timm's resnet*c is mmseg's ResNetV1c; see DESIGN.md).
OPEN_MMLAB_BACKBONES = {"resnet50_v1c": "resnet50c", "resnet101_v1c": "resnet101c"}

_STEM = {"0": "conv1.0", "1": "conv1.1", "3": "conv1.3", "4": "conv1.4", "6": "conv1.6", "7": "bn1"}
_CLASSIFIER = "fc."
# Names of the slots visattn fills with attention blocks (visattn.models.backbones): not in the file.
_ATTN_PARTS = (".se.", ".attn.", ".visattn_attn.")


def is_open_mmlab(spec: Any) -> bool:
    """Whether ``spec`` names an open-mmlab initialisation (``"open-mmlab://<name>"``)."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def _name(spec: str) -> str:
    name = spec[len(PREFIX) :] if is_open_mmlab(spec) else spec
    if name not in OPEN_MMLAB_URLS:
        known = ", ".join(PREFIX + n for n in OPEN_MMLAB_URLS)
        raise ValueError(f"unknown open-mmlab initialisation {spec!r}; known: {known}")
    return name


def open_mmlab_url(spec: str) -> str:
    """The download URL of ``open-mmlab://<name>`` (ValueError listing the known names otherwise)."""
    return OPEN_MMLAB_URLS[_name(spec)]


def convert_open_mmlab_resnet(state_dict: Mapping[str, Any], *, source: str = "") -> dict[str, torch.Tensor]:
    """An mmcv ResNetV1c state dict (or a checkpoint holding one) in timm ``resnet*c`` names.

    The classifier ``fc.*`` is dropped; any key that is neither stem, ``layer1``-``layer4`` nor ``fc``
    raises :class:`visattn.models.convert.ConversionError` naming it and ``source``.
    """
    from .convert import ConversionError, checkpoint_state_dict

    where = f" in {source}" if source else ""
    out: dict[str, torch.Tensor] = {}
    for key, value in checkpoint_state_dict(state_dict).items():
        if key.startswith(_CLASSIFIER):
            continue
        if key.startswith("layer") and key[5:6] in "1234" and key[6:7] == ".":
            new = key
        elif key.startswith("stem.") and key.split(".")[1] in _STEM:
            index, rest = key[len("stem.") :].split(".", 1)
            new = f"{_STEM[index]}.{rest}"
        else:
            raise ConversionError(
                f"key {key!r}{where} is not part of an mmcv ResNetV1c (stem.*, layer1-4.*, fc.*); "
                "is this an open-mmlab resnet*_v1c file?"
            )
        out[new] = value
    return out


def open_mmlab_state_dict(
    spec: str, *, progress: bool = True, model_dir: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """The timm-named state dict of ``open-mmlab://<name>``, downloaded (hash-checked) if not cached."""
    from ..hub import CheckpointError, download_checkpoint
    from .convert import load_torch_checkpoint

    url = open_mmlab_url(spec)
    path = download_checkpoint(
        url,
        progress=progress,
        model_dir=model_dir,
        hint="set model.backbone_pretrained to true (timm's weights) or false (random weights)",
    )
    try:
        raw = load_torch_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001 - any unreadable file becomes one clear error
        raise CheckpointError(f"cannot read the {spec} weights {path}: {err}") from err
    return convert_open_mmlab_resnet(raw, source=str(path))


def load_open_mmlab_init(
    backbone: nn.Module,
    spec: str,
    *,
    backbone_name: str | None = None,
    progress: bool = True,
    model_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """Initialise a timm ``resnet50c`` / ``resnet101c`` (plain or ``features_only``, with or without
    visattn blocks) from ``open-mmlab://resnet50_v1c`` / ``resnet101_v1c``.

    Every tensor of the file must land on a parameter or buffer of the same shape, and every backbone
    tensor must come from the file except the inserted attention blocks (which keep their
    initialisation), ``num_batches_tracked`` counters and a classifier ``fc``. Nothing is loaded unless
    all of that holds; the error names the file, the keys and the shapes.
    """
    from .convert import ConversionError

    name = _name(spec)
    if backbone_name is not None and backbone_name != OPEN_MMLAB_BACKBONES[name]:
        raise ValueError(
            f"model.backbone_pretrained {spec!r} initialises timm's {OPEN_MMLAB_BACKBONES[name]!r}, not "
            f"model.backbone {backbone_name!r}; use "
            + " or ".join(f"{PREFIX}{n} with {b}" for n, b in OPEN_MMLAB_BACKBONES.items())
            + ", or backbone_pretrained: true (timm's weights)"
        )
    state = open_mmlab_state_dict(spec, progress=progress, model_dir=model_dir)
    expected = backbone.state_dict()
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    missing = sorted(
        k
        for k in set(expected) - set(state)
        if not k.endswith("num_batches_tracked")
        and not k.startswith(_CLASSIFIER)
        and not any(part in f".{k}" for part in _ATTN_PARTS)
    )
    if unexpected or shapes or missing:
        parts = [
            f"{what}: {', '.join(items[:6])}" + (f" ... ({len(items)} in all)" if len(items) > 6 else "")
            for what, items in (
                ("unexpected", unexpected),
                ("shape mismatches", shapes),
                ("missing", missing),
            )
            if items
        ]
        raise ConversionError(
            f"{spec} ({open_mmlab_url(spec)}) does not fit this backbone ({'; '.join(parts)}); it "
            f"initialises timm's {OPEN_MMLAB_BACKBONES[name]}"
        )
    backbone.load_state_dict(state, strict=False)
    _logger.info("visattn: backbone initialised from %s (%d tensors)", spec, len(state))
    return backbone
