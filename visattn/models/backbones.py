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
import os
import socket
from functools import partial
from typing import Any
from urllib.parse import urlparse

import timm
import torch.nn as nn
from timm.models import FeatureListNet

from ..registry import attn_info, create_attn

__all__ = ["create_model", "insert_attention", "pretrained_weights_offline_check", "ATTN_SLOTS", "PLACEMENTS"]

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


# Seconds to wait for a TCP connection to the weights' host before calling it unreachable: long enough
# for a slow link, short enough that an offline user is not kept waiting (huggingface_hub retries ~47 s).
PROBE_TIMEOUT_S = 3.0


def _reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or to the proxy the environment names for it) opens."""
    import urllib.request

    parsed = urlparse(url)
    target = parsed
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(parsed.hostname or ""):
        target = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout).close()
    except (OSError, ValueError, TypeError):
        return False
    return True


def _hf_weight_files(cfg) -> list[str]:
    """The file names timm's hub loader tries, in its order (a safetensors alternative first)."""
    name = cfg.hf_hub_filename or "pytorch_model.bin"
    if name.endswith(".safetensors"):
        return [name]
    safe = "model.safetensors" if name == "pytorch_model.bin" else name.rsplit(".", 1)[0] + ".safetensors"
    return [safe, name]


def pretrained_weights_offline_check(backbone: str, timm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check, before timm tries, that ``timm.create_model(backbone, pretrained=True, **timm_kwargs)`` can
    get its weights; returns the timm kwargs to use (unchanged, or pointing timm at the cached file).

    Offline, huggingface_hub retries for about 47 s and then fails without saying what to do. Here: a
    weights file already in the Hugging Face cache or in torch.hub's cache is loaded from there with no
    network access when the hub is unreachable or ``HF_HUB_OFFLINE=1``; a file in neither cache with the
    host unreachable raises :class:`visattn.hub.CheckpointError` within seconds, naming the file, where
    timm looks for it and the options (``pretrained_cfg_overlay=dict(file=...)``, ``pretrained=False``).
    """
    from timm.models import resolve_pretrained_cfg, split_model_name_tag

    from ..hub import CheckpointError

    name, tag = split_model_name_tag(backbone)
    overlay = dict(timm_kwargs.get("pretrained_cfg_overlay") or {})
    cfg = resolve_pretrained_cfg(
        name, pretrained_cfg=timm_kwargs.get("pretrained_cfg") or tag or None, pretrained_cfg_overlay=overlay
    )
    call = f"visattn.create_model({backbone!r}, pretrained=True)"
    if cfg.state_dict is not None or cfg.source == "local-dir":
        return timm_kwargs
    if cfg.file:
        if not os.path.isfile(cfg.file):
            raise CheckpointError(
                f"{call}: the weights file {cfg.file} given in pretrained_cfg_overlay/pretrained_cfg does not "
                "exist; pass the path of a timm state dict (.safetensors, .pth or .bin) or pretrained=False"
            )
        return timm_kwargs
    hf_id = cfg.hf_hub_id
    try:
        import huggingface_hub
        from huggingface_hub import constants as hf_constants
    except ImportError:  # timm then falls back to the URL
        hf_id = None
    if cfg.source == "hf-hub" and not hf_id:
        return timm_kwargs  # timm itself reports the missing huggingface_hub
    if not hf_id and not cfg.url:
        raise CheckpointError(
            f"{call}: timm has no pretrained weights for {backbone!r}; pass pretrained=False"
        )

    cached = None
    if hf_id:
        repo, _, revision = hf_id.partition("@")
        cache_dir = timm_kwargs.get("cache_dir")
        for file_name in _hf_weight_files(cfg):
            found = huggingface_hub.try_to_load_from_cache(
                repo, file_name, cache_dir=cache_dir, revision=revision or None
            )
            if isinstance(found, str):
                cached = found
                break
        endpoint = hf_constants.ENDPOINT
        offline = bool(hf_constants.HF_HUB_OFFLINE)
        file_name = _hf_weight_files(cfg)[0]
        url = f"{endpoint.rstrip('/')}/{repo}/resolve/{revision or 'main'}/{file_name}"
        cache_root = os.fspath(cache_dir or hf_constants.HF_HUB_CACHE)
        hub_place = (
            f"in the Hugging Face cache where timm looks for it, {cache_root}/models--{repo.replace('/', '--')}/"
            f"snapshots/<commit>/{file_name} with refs/{revision or 'main'} holding <commit> (`hf download "
            f"{repo} {file_name}` on a machine with network fills it; HF_HOME moves it)"
        )
    else:
        url, offline, hub_place = cfg.url, False, None
    torch_file = None
    if cfg.url:
        import torch.hub

        torch_file = os.path.join(
            os.fspath(timm_kwargs.get("cache_dir") or os.path.join(torch.hub.get_dir(), "checkpoints")),
            os.path.basename(urlparse(cfg.url).path),
        )
        if cached is None and not hf_id and os.path.isfile(torch_file):
            return timm_kwargs  # timm's URL loader reads its cache without network access
    if cached is None and torch_file and os.path.isfile(torch_file):
        cached = torch_file  # placed by hand where torch.hub keeps downloads
    if not offline and _reachable(url):
        return timm_kwargs
    if cached is not None:
        if cfg.custom_load:
            return timm_kwargs  # a custom loader reads its own format from the hub cache itself
        _logger.info("visattn: %s unreachable; loading %s's weights from the cache %s", url, backbone, cached)
        return {**timm_kwargs, "pretrained_cfg_overlay": {**overlay, "file": cached}}
    why = "HF_HUB_OFFLINE is set" if offline else f"{urlparse(url).netloc} cannot be reached"
    options = [
        f"download {url} and pass pretrained_cfg_overlay=dict(file='/path/to/"
        f"{os.path.basename(urlparse(url).path)}')"
    ]
    if hub_place:
        options.append(f"place it {hub_place}")
    if torch_file:
        options.append(f"place {os.path.basename(torch_file)} (from {cfg.url}) at {torch_file}")
    options.append("pass pretrained=False (random backbone weights)")
    raise CheckpointError(
        f"{call}: timm's weights for {backbone} are not cached and {why}. Options: "
        + "; or ".join(options)
        + "."
    )


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

    ``backbone="local-dir:PATH"`` or ``"hf-hub:org/name"`` rebuilds a model saved by
    :func:`visattn.models.hf.save_pretrained` (blocks and weights; the architecture comes from its
    ``config.json``, so ``attn``, ``attn_kwargs``, ``stages`` and ``placement`` must be left out).
    """
    if isinstance(backbone, str) and backbone.startswith(("local-dir:", "hf-hub:")):
        from .hf import load_model

        given = {"attn": attn, "attn_kwargs": attn_kwargs, "stages": stages}
        given = {k: v for k, v in given.items() if v is not None}
        if placement != "block":
            given["placement"] = placement
        return load_model(backbone, **given, **timm_kwargs)
    _check_backbone(backbone)
    recorded = dict(
        backbone=backbone,
        attn=attn,
        attn_kwargs=attn_kwargs,
        stages=stages,
        placement=placement,
        **timm_kwargs,
    )
    if attn is not None:
        attn_info(attn)
    from . import vit  # ViT families take the method as their attention (timm's attn_layer hook)

    if vit.is_vit_backbone(backbone):
        if stages is not None or placement != "block":
            raise ValueError(
                f"{backbone}: stages/placement apply to CNNs; a ViT's mixer replaces every attention layer"
            )
        model = vit.create_vit(backbone, attn, attn_kwargs=attn_kwargs, pretrained=pretrained, **timm_kwargs)
        from .hf import record_model_args

        record_model_args(model, recorded)  # so save_pretrained can rebuild it, as for CNNs
        return model
    features_only = timm_kwargs.pop("features_only", False)
    out_indices = timm_kwargs.pop("out_indices", None)
    output_fmt = timm_kwargs.pop("output_fmt", "NCHW")
    if not features_only and out_indices is not None:
        raise ValueError("out_indices is only meaningful with features_only=True")
    if pretrained:
        timm_kwargs = pretrained_weights_offline_check(backbone, timm_kwargs)
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
        recorded.update(features_only=True, out_indices=out_indices, output_fmt=output_fmt)
    from .hf import record_model_args

    record_model_args(model, recorded)  # what save_pretrained writes to config.json
    return model
