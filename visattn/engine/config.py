"""Training/evaluation configs: YAML files with sections ``model``, ``data``, ``train``, ``optim``,
``sched`` and ``eval``; ``--set a.b=c`` overrides; validation before anything is built.

Everything is checked before anything runs, by one checker reading declarative tables: :data:`SPEC`
(every key of ``data``, ``train``, ``optim``, ``sched``, ``eval``: a :class:`Rule` giving its type, shape
and range) and :data:`MODEL_SPEC` (the ``model`` section, a segmentor config:
:func:`visattn.models.segmentor.resolve_config`), then a few rules between keys, the backbone against
timm, the head and blocks against the registry and each ``*_kwargs`` against the constructor it feeds.
Every failure is a :class:`ConfigError` naming the full key path, what is expected and what was given;
YAML syntax errors name the file, line and column; an empty file or one without a ``model`` section is
refused rather than training the default model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .config_rules import (
    Bool,
    Choice,
    ConfigError,
    Int,
    Map,
    Num,
    Pair,
    Rule,
    Seq,
    Str,
    _device,
    _show,
    _unknown_msg,
    check_mapping,
)
from .model_check import check_model_config

__all__ = [
    "DEFAULTS",
    "MODEL_SPEC",
    "SPEC",
    "ConfigError",
    "Rule",
    "apply_overrides",
    "check_model_config",
    "load_config",
    "read_yaml",
    "validate_config",
]


_POS_NUM = Num(0, lo_open=True)
_UNIT = Num(0, 1, hi_open=True)
SYNTHETIC_SPEC: dict[str, Rule] = {
    "train_length": Int(1),
    "val_length": Int(1),
    "size": Pair(),
    "seed": Int(0, 2**32 - 1),
    "max_shapes": Int(1),
}
# Every key of every section except ``model``: (default, rule). One table, read by one checker.
_SPEC: dict[str, dict[str, tuple[Any, Rule]]] = {
    "data": {
        "dataset": ("synthetic", Choice("synthetic", "cityscapes", "ade20k", "voc")),
        "root": (None, Str(optional=True)),
        "train_split": (None, Str(optional=True)),
        "val_split": (None, Str(optional=True)),
        "num_classes": (None, Int(1, optional=True)),
        "crop_size": ([64, 64], Pair()),
        # base (long, short) of the random resize; None: the image size
        "scale": (None, Seq(2, Int(1), "[long, short] of positive ints", optional=True)),
        "ratio_range": ([0.5, 2.0], Seq(2, _POS_NUM, "[lo, hi] with 0 < lo <= hi", lambda v: v[0] <= v[1])),
        "cat_max_ratio": (0.75, Num(0, 1, lo_open=True)),
        "flip": (True, Bool()),
        "photometric": (True, Bool()),
        "reduce_zero_label": (None, Bool(optional=True)),
        "voc_aug": (False, Bool()),
        "num_workers": (0, Int(0)),
        "synthetic": ({}, Map(SYNTHETIC_SPEC)),
    },
    "train": {
        "iters": (1000, Int(1)),
        "batch_size": (8, Int(1)),  # global batch (all processes, all accumulation steps)
        "accum_steps": (1, Int(1)),
        "seed": (0, Int(0, 2**32 - 1)),  # numpy's seed range
        "deterministic": (False, Bool()),
        "amp": (None, Choice(None, "bf16", "fp16")),  # fp16: CUDA only
        "ignore_index": (255, Int()),
        "work_dir": ("runs/demo", Str()),
        "log_interval": (10, Int(1)),  # a modulus of the iteration
        "ckpt_interval": (500, Int(1)),
        "eval_interval": (0, Int(0)),  # 0: evaluate at the end only
        "device": (None, Rule("a torch device such as 'cpu', 'cuda' or 'cuda:1'", _device, optional=True)),
        "sync_bn": (True, Bool()),  # SyncBatchNorm under torchrun on CUDA (torch's is CUDA-only)
        "norm_eval": (False, Bool()),  # BatchNorm layers in eval mode while training (frozen statistics)
        "tensorboard": (False, Bool()),
        "grad_clip": (None, Num(0, lo_open=True, optional=True)),
    },
    "optim": {
        "type": ("sgd", Choice("sgd", "adamw")),
        "lr": (0.01, _POS_NUM),
        "momentum": (0.9, _UNIT),
        "weight_decay": (5e-4, Num(0)),
        "betas": ([0.9, 0.999], Seq(2, _UNIT, "[beta1, beta2], two numbers in [0, 1)")),
        "nesterov": (False, Bool()),
    },
    "sched": {
        "power": (0.9, Num(0)),
        "min_lr": (1e-4, Num(0)),
        "warmup_iters": (0, Int(0)),
        "warmup_ratio": (1e-6, Num(0, 1)),
    },
    "eval": {
        "mode": ("whole", Choice("whole", "slide")),
        "crop_size": (None, Pair(optional=True)),
        "stride": (None, Pair(optional=True)),
        "scales": ([1.0], Seq(None, _POS_NUM, "a non-empty list of positive numbers")),
        "flip": (False, Bool()),
        "max_images": (None, Int(1, optional=True)),
    },
}
DEFAULTS: dict[str, Any] = {
    "model": {},
    **{sec: {k: copy.deepcopy(v[0]) for k, v in spec.items()} for sec, spec in _SPEC.items()},
}
SPEC: dict[str, dict[str, Rule]] = {sec: {k: v[1] for k, v in spec.items()} for sec, spec in _SPEC.items()}


def _model_data_dataset(v: Any) -> bool:
    from ..models.palettes import DATASETS

    return isinstance(v, str) and v.lower() in DATASETS


def _open_mmlab_init(v: Any) -> bool:
    from ..models.mmlab_init import OPEN_MMLAB_URLS, PREFIX

    return isinstance(v, str) and v.startswith(PREFIX) and v[len(PREFIX) :] in OPEN_MMLAB_URLS


_RGB = Seq(3, Num(), "three numbers [r, g, b] (0-255 scale)")
# The ``model`` section (a segmentor config, visattn.models.segmentor.DEFAULT_CONFIG): the type and range
# of each key; names (backbone, head, blocks) and the keyword arguments of the parts are checked by
# check_model_config against timm, the heads and the block registry.
MODEL_SPEC: dict[str, Rule] = {
    "name": Str(optional=True),
    "backbone": Str(),
    "backbone_kwargs": Map(optional=True),
    "backbone_pretrained": Rule(
        "true (timm's weights), false (random) or 'open-mmlab://resnet50_v1c' / 'open-mmlab://resnet101_v1c' "
        "(mmseg's initialisation)",
        lambda v: isinstance(v, bool) or _open_mmlab_init(v),
    ),
    "backbone_attn": Str(optional=True),
    "backbone_attn_kwargs": Map(optional=True),
    "output_stride": Choice(8, 16, 32, None),
    # ViT backbones only: the simple feature pyramid (visattn.models.vit_backbone.NECK_DEFAULTS).
    "neck_kwargs": Map(
        {
            "channels": Int(1),
            "decode_block": Int(optional=True),
            "aux_block": Int(optional=True),
        },
        optional=True,
    ),
    "head": Str(),
    "head_kwargs": Map(optional=True),
    "attn": Str(optional=True),
    "attn_kwargs": Map(optional=True),
    "num_classes": Int(1),
    "dropout": Num(0, 1, hi_open=True),
    "aux": Bool(),
    "aux_kwargs": Map(optional=True),
    "aux_weight": Num(0),
    "data": Map(
        {
            "dataset": Rule("'cityscapes' or 'ade20k' (a palette)", _model_data_dataset, optional=True),
            "mean": _RGB,
            "std": Seq(3, _POS_NUM, "three positive numbers [r, g, b] (0-255 scale)"),
            "test_scale": Seq(2, Int(1), "[long, short] of positive ints", optional=True),
            "crop_size": Pair(optional=True),
            "slide_stride": Pair(optional=True),
        },
        optional=True,
    ),
}


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# -- YAML ---------------------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """yaml's SafeLoader, except that a key given twice in one mapping is an error: plain YAML keeps the
    last one silently, which hides the edit a user believes is in effect."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: the base constructor reports it
            continue
        if first is not None and key != "<<":
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given on line {first + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(err: yaml.YAMLError) -> tuple[str, int | None, int | None]:
    """(problem, 1-based line, 1-based column) of a YAML error."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        problem = err.problem or str(err)
        if err.context:
            problem = f"{problem} ({err.context})"
        return problem, err.problem_mark.line + 1, err.problem_mark.column + 1
    return str(err).strip(), None, None


def parse_yaml(text: str) -> Any:
    """A YAML document (duplicate keys refused); raises yaml.YAMLError."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader


def read_yaml(path: str | os.PathLike) -> Any:
    """The YAML document in ``path``; a syntax error is a ConfigError naming the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file '{path}' cannot be read: {err}") from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as err:
        problem, line, col = _yaml_problem(err)
        where = f"{path}:{line}:{col}" if line is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {problem}; fix the file at that line") from None


# -- overrides and loading -------------------------------------------------------------------------
def apply_overrides(cfg: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` strings (values parsed as YAML: ``0.02``, ``true``, ``[512, 512]``, ``null``)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            hint = ""
            if str(item).endswith((".yaml", ".yml")):
                hint = "; give the config file before --set (or after --)"
            raise ConfigError(
                f"--set expects KEY=VALUE pairs such as optim.lr=0.02, got {str(item)!r} (no key=value){hint}"
            )
        key = key.strip()
        try:
            value = parse_yaml(text)
        except yaml.YAMLError as err:
            problem, _, col = _yaml_problem(err)
            at = f" at column {col}" if col is not None else ""
            raise ConfigError(
                f"--set {key}: cannot parse the value {text!r} as YAML{at}: {problem} "
                "(quote strings, write lists as [a, b])"
            ) from None
        parts = key.split(".")
        if any(not p.strip() for p in parts):
            raise ConfigError(f"--set {item!r}: {key!r} is not a key path like optim.lr")
        node = cfg
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if nxt is None:  # an empty section in YAML ("train:") reads as null
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"--set {key}: config key {'.'.join(parts[: i + 1])!r} is not a section "
                    f"(it holds {_show(nxt)})"
                )
            node = nxt
        node[parts[-1]] = value
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML config (``None``: ``configs/demo.yaml``, the embedded demo), apply overrides, validate.

    The file must hold a mapping with a ``model`` section: an empty file or one without a model would
    otherwise train the default segmentor silently.
    """
    if path is None:
        path = demo_config_path()
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"config file {str(path)!r} is a folder; give a YAML file (e.g. {path}/config.yaml)"
        )
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    raw = read_yaml(path)
    if raw is None:
        raise ConfigError(
            f"config file '{path}' is empty; a config needs at least a 'model' section (see configs/demo.yaml)"
        )
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {_show(raw)}")
    if not raw.get("model"):
        raise ConfigError(
            f"config file '{path}' has no 'model' section; add one (backbone, head, num_classes: see "
            "configs/demo.yaml) rather than training the default model"
        )
    raw = apply_overrides(dict(raw), overrides)
    return validate_config(raw)


def demo_config_path() -> Path:
    """The embedded demo config: package data (``visattn/_data/demo.yaml``, the repository's
    ``configs/demo.yaml``), so ``visattn train`` without a config works from an installed wheel too."""
    from ..hub import package_data_file

    return package_data_file("demo.yaml")


# -- checking -------------------------------------------------------------------------------------
def validate_config(raw: Mapping[str, Any], *, check_paths: bool = True) -> dict[str, Any]:
    """Defaults filled in, every key checked for type and range, cross-key rules, the model section
    (:func:`check_model_config`) and the dataset folder checked; raises ConfigError naming the key."""
    from ..models.segmentor import resolve_config

    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {_show(raw)}")
    unknown = sorted(set(map(str, raw)) - set(DEFAULTS))
    if unknown:
        raise ConfigError(_unknown_msg(unknown[0], "", DEFAULTS))
    cfg = copy.deepcopy(DEFAULTS)
    for sec, spec in SPEC.items():
        given = raw.get(sec)
        if given is None:  # absent, or an empty section ("train:" in YAML)
            continue
        Map().check(sec, given)
        check_mapping(given, spec, sec + ".")
        cfg[sec].update(copy.deepcopy(dict(given)))
    model = raw.get("model")
    if model is None:
        raise ConfigError(
            "config has no 'model' section; add one (backbone, head, num_classes: see configs/demo.yaml)"
        )
    Map().check("model", model)
    if not model:
        raise ConfigError(
            "config key 'model' is empty; name at least model.backbone, model.head, model.num_classes"
        )
    check_model_config(model, "model.")
    try:
        cfg["model"] = resolve_config(dict(model))
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config section 'model': {err}") from None
    _check_cross(cfg)
    data = cfg["data"]
    if data["num_classes"] is None:
        data["num_classes"] = cfg["model"]["num_classes"]
    if data["dataset"] != "synthetic":
        if data["root"] is None:
            raise ConfigError(f"config key 'data.root' must name the {data['dataset']} folder")
        if check_paths and not os.path.isdir(data["root"]):
            raise ConfigError(f"config key 'data.root': dataset folder {data['root']!r} does not exist")
    return cfg


def _check_cross(cfg: Mapping[str, Any]) -> None:
    """Rules between keys; each message names every key involved."""
    data, optim, model = cfg["data"], cfg["optim"], cfg["model"]
    if data["num_classes"] is not None and data["num_classes"] != model["num_classes"]:
        raise ConfigError(
            f"config key 'data.num_classes' ({data['num_classes']}) differs from 'model.num_classes' "
            f"({model['num_classes']}); set one of them (data.num_classes defaults to model.num_classes)"
        )
    if optim["nesterov"] and (optim["type"] != "sgd" or optim["momentum"] <= 0):
        raise ConfigError(
            "config key 'optim.nesterov' needs optim.type 'sgd' with optim.momentum > 0, got "
            f"type {optim['type']!r}, momentum {optim['momentum']!r}"
        )
    if cfg["sched"]["min_lr"] > optim["lr"]:
        raise ConfigError(
            f"config key 'sched.min_lr' ({cfg['sched']['min_lr']}) must not exceed 'optim.lr' ({optim['lr']}): "
            "the poly schedule decays from optim.lr to sched.min_lr"
        )
    if cfg["eval"]["mode"] == "slide" and cfg["eval"]["crop_size"] is None:
        if not (model.get("data") or {}).get("crop_size"):
            raise ConfigError(
                "config key 'eval.crop_size' is needed by eval.mode 'slide' (the window size): set it, "
                "or model.data.crop_size"
            )
