"""Training/evaluation configs: YAML files with sections ``model``, ``data``, ``train``, ``optim``,
``sched`` and ``eval``; ``--set a.b=c`` overrides; validation before anything is built.

``model`` is a segmentor config (:func:`visattn.models.segmentor.resolve_config`), the other sections
are checked against :data:`DEFAULTS`: an unknown key, a value of the wrong type or a missing dataset
folder raises :class:`ConfigError` naming the key (or path).
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import VisattnError

__all__ = ["DEFAULTS", "ConfigError", "apply_overrides", "load_config", "validate_config"]

_NUM = (int, float)
# (default, allowed types); a None default means "optional" (None or the listed types).
_SPEC: dict[str, dict[str, tuple[Any, tuple[type, ...]]]] = {
    "data": {
        "dataset": ("synthetic", (str,)),
        "root": (None, (str,)),
        "train_split": (None, (str,)),
        "val_split": (None, (str,)),
        "num_classes": (None, (int,)),
        "crop_size": ([64, 64], (list, int)),
        "scale": (None, (list,)),  # base (long, short) of the random resize; None: the image size
        "ratio_range": ([0.5, 2.0], (list,)),
        "cat_max_ratio": (0.75, _NUM),
        "flip": (True, (bool,)),
        "photometric": (True, (bool,)),
        "reduce_zero_label": (None, (bool,)),
        "voc_aug": (False, (bool,)),
        "num_workers": (0, (int,)),
        "synthetic": ({}, (dict,)),
    },
    "train": {
        "iters": (1000, (int,)),
        "batch_size": (8, (int,)),  # global batch (all processes, all accumulation steps)
        "accum_steps": (1, (int,)),
        "seed": (0, (int,)),
        "deterministic": (False, (bool,)),
        "amp": (None, (str,)),  # None / "bf16" / "fp16" (CUDA only)
        "ignore_index": (255, (int,)),
        "work_dir": ("runs/demo", (str,)),
        "log_interval": (10, (int,)),
        "ckpt_interval": (500, (int,)),
        "eval_interval": (0, (int,)),  # 0: evaluate at the end only
        "device": (None, (str,)),  # None: cuda if available
        "sync_bn": (True, (bool,)),  # SyncBatchNorm under torchrun on CUDA (torch's is CUDA-only)
        "norm_eval": (False, (bool,)),  # BatchNorm layers in eval mode while training (frozen statistics)
        "tensorboard": (False, (bool,)),
        "grad_clip": (None, _NUM),
    },
    "optim": {
        "type": ("sgd", (str,)),
        "lr": (0.01, _NUM),
        "momentum": (0.9, _NUM),
        "weight_decay": (5e-4, _NUM),
        "betas": ([0.9, 0.999], (list,)),
        "nesterov": (False, (bool,)),
    },
    "sched": {
        "power": (0.9, _NUM),
        "min_lr": (1e-4, _NUM),
        "warmup_iters": (0, (int,)),
        "warmup_ratio": (1e-6, _NUM),
    },
    "eval": {
        "mode": ("whole", (str,)),
        "crop_size": (None, (list, int)),
        "stride": (None, (list, int)),
        "scales": ([1.0], (list,)),
        "flip": (False, (bool,)),
        "max_images": (None, (int,)),
    },
}
DEFAULTS: dict[str, Any] = {
    "model": {},
    **{sec: {k: copy.deepcopy(v[0]) for k, v in spec.items()} for sec, spec in _SPEC.items()},
}
CHOICES = {
    ("data", "dataset"): ("synthetic", "cityscapes", "ade20k", "voc"),
    ("optim", "type"): ("sgd", "adamw"),
    ("train", "amp"): (None, "bf16", "fp16"),
    ("eval", "mode"): ("whole", "slide"),
}


class ConfigError(VisattnError, ValueError):
    """A bad config value; the message names the key."""


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(cfg: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` strings (values parsed as YAML: ``0.02``, ``true``, ``[512, 512]``, ``null``)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: cannot parse value {text!r}: {err}") from None
        parts = key.strip().split(".")
        node = cfg
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML config (``None``: ``configs/demo.yaml``, the embedded demo), apply overrides, validate."""
    if path is None:
        path = demo_config_path()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(raw).__name__}")
    raw = apply_overrides(dict(raw), overrides)
    return validate_config(raw)


def demo_config_path() -> Path:
    here = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    if here.is_file():
        return here
    return Path(__file__).with_name("demo.yaml")


def _check_type(name: str, value: Any, types: tuple[type, ...], optional: bool) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        want = " or ".join(t.__name__ for t in types) + (" or null" if optional else "")
        raise ConfigError(f"config key {name!r} must be {want}, got {type(value).__name__} {value!r}")


def validate_config(raw: Mapping[str, Any], *, check_paths: bool = True) -> dict[str, Any]:
    """Defaults filled in, every key and type checked, dataset folder checked; raises ConfigError."""
    from ..models.segmentor import resolve_config

    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ConfigError(_unknown_msg(unknown[0], "", DEFAULTS))
    cfg = copy.deepcopy(DEFAULTS)
    for sec, spec in _SPEC.items():
        given = raw.get(sec) or {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"config key {sec!r} must be a mapping, got {type(given).__name__}")
        for key, value in given.items():
            if key not in spec:
                raise ConfigError(_unknown_msg(key, sec + ".", spec))
            default, types = spec[key]
            _check_type(f"{sec}.{key}", value, types, optional=default is None)
            cfg[sec][key] = copy.deepcopy(value)
    for (sec, key), choices in CHOICES.items():
        if cfg[sec][key] not in choices:
            raise ConfigError(
                f"config key '{sec}.{key}' must be one of {list(choices)}, got {cfg[sec][key]!r}"
            )
    for sec, key in (("train", "iters"), ("train", "batch_size"), ("train", "accum_steps")):
        if cfg[sec][key] < 1:
            raise ConfigError(f"config key '{sec}.{key}' must be >= 1, got {cfg[sec][key]}")
    if cfg["optim"]["lr"] <= 0:
        raise ConfigError(f"config key 'optim.lr' must be > 0, got {cfg['optim']['lr']}")
    model = raw.get("model") or {}
    if not isinstance(model, Mapping):
        raise ConfigError(f"config key 'model' must be a mapping, got {type(model).__name__}")
    try:
        cfg["model"] = resolve_config(dict(model))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config section 'model': {err}") from None
    data = cfg["data"]
    if data["num_classes"] is None:
        data["num_classes"] = cfg["model"]["num_classes"]
    elif data["num_classes"] != cfg["model"]["num_classes"]:
        raise ConfigError(
            f"config key 'data.num_classes' ({data['num_classes']}) differs from 'model.num_classes' "
            f"({cfg['model']['num_classes']})"
        )
    from ..data import SYNTHETIC_DEFAULTS

    bad = sorted(set(data["synthetic"]) - set(SYNTHETIC_DEFAULTS))
    if bad:
        raise ConfigError(_unknown_msg(bad[0], "data.synthetic.", SYNTHETIC_DEFAULTS))
    if data["dataset"] != "synthetic":
        if data["root"] is None:
            raise ConfigError(f"config key 'data.root' must name the {data['dataset']} folder")
        if check_paths and not os.path.isdir(data["root"]):
            raise ConfigError(f"config key 'data.root': dataset folder {data['root']!r} does not exist")
    return cfg


def _unknown_msg(key: str, prefix: str, valid: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
    return f"unknown config key {prefix + str(key)!r}{hint}; valid keys: {sorted(prefix + k for k in valid)}"
