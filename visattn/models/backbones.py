"""timm backbones with visattn blocks inserted: ``visattn.create_model``.

Attention is inserted into a model that timm has already built (and loaded pretrained weights
into), so timm's weights, pretrained configs, ``output_stride``, gradient checkpointing and
``torch.compile`` keep working, and the new blocks keep their initialisation: with an
identity-at-init block the model computes exactly what the plain pretrained model computes.

Stages are indexed like timm's ``out_indices``: entry ``i`` of ``model.feature_info``.
"""

from __future__ import annotations

import difflib
import logging
from functools import partial
from typing import Any

import timm
import torch.nn as nn
from timm.models import FeatureListNet

from ..registry import attn_info, create_attn

__all__ = ["create_model", "insert_attention", "ATTN_SLOTS", "PLACEMENTS"]

_logger = logging.getLogger("visattn")

# Attribute names under which timm blocks hold their optional attention layer (ResNet family: `se`;
# ByobNet family: `attn`), filled only when empty so existing weights are never replaced.
ATTN_SLOTS = ("se", "attn")
PLACEMENTS = ("block", "stage")
STAGE_CHILD = "visattn_attn"


def _feature_info(model: nn.Module) -> list[dict[str, Any]]:
    info = getattr(model, "feature_info", None)
    info = getattr(info, "info", info)
    if not isinstance(info, (list, tuple)) or not info:
        raise ValueError(
            f"{type(model).__name__} has no timm feature_info; visattn needs a timm CNN backbone"
        )
    return list(info)


def _stage_ends(
    model: nn.Module, info: list[dict[str, Any]]
) -> tuple[list[tuple[str, nn.Module]], list[int]]:
    """named_modules() in registration (= execution, for timm CNNs) order, and for each feature
    entry the index of the last module inside it."""
    named = list(model.named_modules())
    ends = []
    for entry in info:
        path = entry["module"]
        inside = [i for i, (n, _) in enumerate(named) if n == path or n.startswith(path + ".")]
        if not inside:
            raise ValueError(f"feature_info module {path!r} not found in {type(model).__name__}")
        ends.append(max(inside))
    return named, ends


def _stage_of(index: int, ends: list[int]) -> int:
    for stage, end in enumerate(ends):
        if index <= end:
            return stage
    return len(ends)


def _empty_slots(model: nn.Module, named, ends, stages) -> dict[int, list[tuple[nn.Module, str]]]:
    found: dict[int, list[tuple[nn.Module, str]]] = {s: [] for s in stages}
    for index, (_, module) in enumerate(named):
        stage = _stage_of(index, ends)
        if stage not in found:
            continue
        for slot in ATTN_SLOTS:
            if hasattr(module, slot) and (
                getattr(module, slot) is None or type(getattr(module, slot)) is nn.Identity
            ):
                found[stage].append((module, slot))
    return found


class _ChannelProbe(nn.Identity):
    """Stands in an empty slot for one dry forward, to learn the channel count that reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.channels: int | None = None

    def forward(self, x):
        self.channels = int(x.shape[1])
        return x


def _probe_channels(model: nn.Module, slots: list[tuple[nn.Module, str]]) -> list[int]:
    import torch

    probes = []
    for module, slot in slots:
        probe = _ChannelProbe()
        probes.append((module, slot, getattr(module, slot), probe))
        setattr(module, slot, probe)
    was_training = model.training
    in_chans = getattr(model, "in_chans", None) or _first_conv_in(model)
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_chans, 64, 64))
    finally:
        model.train(was_training)
        for module, slot, old, _ in probes:
            setattr(module, slot, old)
    channels = [p.channels for *_, p in probes]
    if any(c is None for c in channels):
        raise ValueError("an attention slot was not reached by a forward pass; use placement='stage'")
    return channels


def _first_conv_in(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def _apply_stage_attention(module: nn.Module, inputs, output):
    return getattr(module, STAGE_CHILD)(output)


def _last_block(model: nn.Module, path: str) -> nn.Module:
    module = model.get_submodule(path)
    while isinstance(module, nn.Sequential) and len(module):
        module = module[-1]
    return module


def insert_attention(
    model: nn.Module,
    attn: str,
    *,
    attn_kwargs: dict[str, Any] | None = None,
    stages: tuple[int, ...] | list[int] | None = None,
    placement: str = "block",
) -> list[str]:
    """Insert block ``attn`` into a plain timm CNN in place; returns the names of the new modules.

    ``placement="block"`` fills the empty attention slot of every residual block of the chosen stages
    (where timm puts ``attn_layer``); ``placement="stage"`` adds the block after the last block of
    each chosen stage (any timm CNN family; the block becomes child ``visattn_attn`` of that last block
    and runs as its forward hook, which survives timm's feature wrappers and checkpointing).
    """
    attn_info(attn)  # ValueError with close names if unknown
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    info = _feature_info(model)
    valid = list(range(len(info)))
    stages = tuple(valid[-2:]) if stages is None else tuple(stages)
    bad = [s for s in stages if s not in valid]
    if bad or not stages:
        choices = ", ".join(
            f"{i}: {e['module']} ({e['num_chs']} ch, stride {e['reduction']})" for i, e in enumerate(info)
        )
        raise ValueError(
            f"stages {list(stages)} out of range for {type(model).__name__}; valid stages: {choices}"
        )
    factory = partial(create_attn, attn, **(attn_kwargs or {}))
    inserted: list[str] = []
    if placement == "stage":
        for s in stages:
            target = _last_block(model, info[s]["module"])
            target.add_module(STAGE_CHILD, factory(int(info[s]["num_chs"])))
            target.register_forward_hook(_apply_stage_attention)
            inserted.append(target)
    else:
        named, ends = _stage_ends(model, info)
        slots = _empty_slots(model, named, ends, stages)
        empty = [s for s in stages if not slots[s]]
        if empty:
            raise ValueError(
                f"placement='block' found no empty attention slot ({'/'.join(ATTN_SLOTS)}) in stage(s) {empty} of "
                f"{type(model).__name__}; use placement='stage', which works for every timm CNN"
            )
        flat = [slot for s in stages for slot in slots[s]]
        for (module, slot), channels in zip(flat, _probe_channels(model, flat)):
            setattr(module, slot, factory(channels))
            inserted.append(getattr(module, slot))
    ids = {id(m) for m in inserted}
    return [name for name, m in model.named_modules() if id(m) in ids]


def _check_backbone(backbone: str) -> None:
    if not isinstance(backbone, str) or not timm.is_model(backbone):
        close = difflib.get_close_matches(str(backbone), timm.list_models(), n=5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown timm backbone {backbone!r}.{hint} See timm.list_models().")


def create_model(
    backbone: str,
    attn: str | None = None,
    *,
    attn_kwargs: dict[str, Any] | None = None,
    stages: tuple[int, ...] | list[int] | None = None,
    placement: str = "block",
    pretrained: bool = False,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm model with visattn block ``attn`` inserted (``attn=None``: the plain model).

    Args:
        backbone: a timm model name (``timm.list_models()``).
        attn: a visattn block name (``visattn.list_attns()``) or None.
        attn_kwargs: keyword hyperparameters of the block.
        stages: feature stages (timm ``out_indices`` numbering) that get attention; default the last two.
        placement: ``"block"`` (inside every residual block of the stages) or ``"stage"`` (after each stage).
        pretrained: load timm's pretrained backbone weights (``pretrained_cfg_overlay=dict(file=...)`` and
            ``checkpoint_path`` work offline); the attention blocks keep their initialisation.
        **timm_kwargs: passed to ``timm.create_model`` (``num_classes``, ``output_stride``, ``features_only``,
            ``out_indices``, ``drop_path_rate`` ...).
    """
    _check_backbone(backbone)
    if attn is not None:
        attn_info(attn)
    features_only = timm_kwargs.pop("features_only", False)
    out_indices = timm_kwargs.pop("out_indices", None)
    output_fmt = timm_kwargs.pop("output_fmt", "NCHW")
    if not features_only and out_indices is not None:
        raise ValueError("out_indices is only meaningful with features_only=True")
    model = timm.create_model(backbone, pretrained=pretrained, **timm_kwargs)
    if attn is not None:
        names = insert_attention(model, attn, attn_kwargs=attn_kwargs, stages=stages, placement=placement)
        params = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
        _logger.info(
            "visattn: inserted %d %r block(s) into %s (%d new parameters at their initialisation%s): %s",
            len(names),
            attn,
            backbone,
            params,
            "; backbone weights from timm" if pretrained else "",
            ", ".join(names),
        )
    if features_only:
        info = _feature_info(model)
        out_indices = tuple(range(len(info))) if out_indices is None else tuple(out_indices)
        # timm flattens the top-level Sequential when feature points sit inside it ('stages.0').
        flatten = any("." in entry["module"] for entry in info)
        model = FeatureListNet(
            model, out_indices=out_indices, output_fmt=output_fmt, flatten_sequential=flatten
        )
    return model
