"""mmsegmentation checkpoints -> visattn segmentors, by key mapping alone (no mmcv / mmseg import).

The segmentors of visattn are mmseg's ``EncoderDecoder`` with the same top-level names (``backbone``,
``decode_head``, ``auxiliary_head``) and heads of the same layout, so most keys are equal. The
differences, all mapped here in both directions:

- ResNetV1c's deep stem ``backbone.stem.{0,1,3,4,6}`` is timm's ``backbone.conv1.{0,1,3,4,6}`` and
  ``backbone.stem.7`` (the stem's last BN) is ``backbone.bn1``; ``layer1``-``layer4`` are equal.
- mmcv's ``Scale`` modules (``cca.gamma.scale``, ``pam.gamma.scale``, ``cam.gamma.scale``, shape ())
  are parameters ``*.gamma`` of shape (1,).
- mmcv's ``ContextBlock`` names ``conv_mask`` / ``channel_add_conv`` are the ``gcnet`` block's
  ``attn_logits`` / ``transform``.

:func:`load_mmseg_state_dict` loads strictly: every key mapped, every shape checked, nothing dropped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "checkpoint_state_dict",
    "convert_mmseg",
    "is_mmseg_state_dict",
    "load_mmseg_state_dict",
    "load_state_dict_strict",
    "load_torch_checkpoint",
    "to_mmseg",
]

_logger = logging.getLogger("visattn")

_STEM_TO_TIMM = {"0": "conv1.0", "1": "conv1.1", "3": "conv1.3", "4": "conv1.4", "6": "conv1.6", "7": "bn1"}
_STEM_FROM_TIMM = {v: k for k, v in _STEM_TO_TIMM.items()}
_HEADS = ("decode_head.", "auxiliary_head.")
# (mmseg infix, visattn infix) inside a head.
_HEAD_RENAMES = (
    (".gc_block.conv_mask.", ".gc_block.attn_logits."),
    (".gc_block.channel_add_conv.", ".gc_block.transform."),
)
_SCALE_SUFFIX = ".gamma.scale"
_BACKBONE_LAYER = re.compile(r"^layer[1-4]\.")


class ConversionError(ValueError):
    """A state dict that does not have the layout of an mmsegmentation ResNetV1c-D8 segmentor."""


def checkpoint_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (``checkpoint["state_dict"]``, as mmseg saves it, or the
    mapping itself), with a DataParallel ``module.`` prefix removed; every value must be a tensor."""
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping):
        raise ConversionError(
            f"expected a state dict (a mapping of names to tensors), got {type(state).__name__}"
        )
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key[len("module.") :] if key.startswith("module.") else key] = value
    return out


def is_mmseg_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True when the keys are mmseg's layout (a ResNetV1c ``backbone.stem.*`` or mmcv ``*.gamma.scale``)."""
    return any(k.startswith("backbone.stem.") or k.endswith(_SCALE_SUFFIX) for k in state_dict)


def _backbone_key(rest: str, table: dict[str, str], source: str) -> str:
    if _BACKBONE_LAYER.match(rest):
        return rest
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    raise ConversionError(
        f"backbone key {'backbone.' + rest!r} is not part of a {source} ResNetV1c-D8 backbone"
    )


def convert_mmseg(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Map an mmseg ``EncoderDecoder`` state dict (or a checkpoint holding one) to visattn's keys.

    Pure renaming and reshaping: the tensors are the same objects or views. Raises ConversionError for
    a key outside ``backbone.`` / ``decode_head.`` / ``auxiliary_head.`` or a backbone key that is not
    ResNetV1c's.
    """
    state = checkpoint_state_dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            stem = {f"stem.{k}": v for k, v in _STEM_TO_TIMM.items()}
            new = "backbone." + _backbone_key(key[len("backbone.") :], stem, "mmseg")
        elif key.startswith(_HEADS):
            new = key
            for old, ours in _HEAD_RENAMES:
                new = new.replace(old, ours)
            if new.endswith(_SCALE_SUFFIX):
                new = new[: -len(".scale")]
                if value.numel() != 1:
                    raise ConversionError(
                        f"{key}: an mmcv Scale holds one number, got shape {tuple(value.shape)}"
                    )
                value = value.reshape(1)
        else:
            raise ConversionError(
                f"key {key!r} is outside backbone / decode_head / auxiliary_head: not an mmseg "
                "EncoderDecoder state dict"
            )
        if new in out:
            raise ConversionError(f"two keys map to {new!r}")
        out[new] = value
    return out


def to_mmseg(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_mmseg`: visattn keys -> mmseg keys (for the mmseg architectures)."""
    out: dict[str, torch.Tensor] = {}
    scales = (".cca.gamma", ".pam.gamma", ".cam.gamma")
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            rest = key[len("backbone.") :]
            new = "backbone." + _backbone_key(
                rest, {k: f"stem.{v}" for k, v in _STEM_FROM_TIMM.items()}, "timm"
            )
        elif key.startswith(_HEADS):
            new = key
            for theirs, ours in _HEAD_RENAMES:
                new = new.replace(ours, theirs)
            if new.endswith(scales):
                new, value = new + ".scale", value.reshape(())
        else:
            raise ConversionError(f"key {key!r} is outside backbone / decode_head / auxiliary_head")
        out[new] = value
    return out


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "", load: bool = True
) -> None:
    """``model.load_state_dict(state_dict)`` after checking every key and shape, with one error that
    lists all missing keys, unexpected keys and shape mismatches (``source`` names the file).
    ``load=False`` only checks (e.g. against a model on the meta device)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:

        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {show(shapes)}")
        where = f" from {source}" if source else ""
        raise ConversionError(
            f"the checkpoint{where} does not fit {type(model).__name__} ({'; '.join(parts)}). Does the "
            "model's config (backbone depth, head, num_classes) match the checkpoint's?"
        )
    if load:
        model.load_state_dict(dict(state_dict), strict=True)


def load_mmseg_state_dict(model: nn.Module, checkpoint: Mapping[str, Any], *, source: str = "") -> nn.Module:
    """Load an mmseg checkpoint or state dict (or one in visattn's layout) strictly into ``model``."""
    state = checkpoint_state_dict(checkpoint)
    if is_mmseg_state_dict(state):
        state = convert_mmseg(state)
    load_state_dict_strict(model, state, source=source)
    return model


class _Opaque:
    """Stands in, while unpickling with ``weights_only=True``, for a class of a checkpoint's metadata
    (numpy scalars, mmengine's message hub ...): it accepts any arguments and state and runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


def load_torch_checkpoint(path: str, *, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; classes in the file outside torch's allowlist (the
    metadata of mmseg / mmengine checkpoints) load as inert placeholders, never as themselves.

    ``.safetensors`` files load with safetensors.
    """
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    import pickle

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if not names:
            raise
    stand_ins = [
        (type(f"Opaque_{i}", (_Opaque,), {"__qualname__": name}), name) for i, name in enumerate(names)
    ]
    _logger.info("visattn: %s: metadata classes %s load as inert placeholders", path, ", ".join(names))
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location=map_location, weights_only=True)
