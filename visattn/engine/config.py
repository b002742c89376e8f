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
import difflib
import inspect
import math
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..annotations import describe_hint, matches_hint
from ..errors import VisattnError

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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    # bool is an int to Python, never a number to a user; nan/inf are never a meaningful setting.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


@dataclass(frozen=True)
class Rule:
    """One config key's contract: ``test(value)`` is True for a valid value, ``expect`` says what is
    valid in words (used verbatim in the error), ``optional`` also admits null. ``spec`` makes the value
    a mapping whose own keys follow that table (checked recursively, paths joined with dots)."""

    expect: str
    test: Callable[[Any], bool]
    optional: bool = False
    spec: Mapping[str, Rule] | None = None

    def check(self, path: str, value: Any) -> None:
        if value is None and self.optional:
            return
        if not self.test(value):
            raise ConfigError(_bad(path, self.expect + (" or null" if self.optional else ""), value))
        if self.spec is not None:
            check_mapping(value, self.spec, path + ".")


def Int(lo: int | None = None, hi: int | None = None, *, optional: bool = False) -> Rule:
    """An int (not a bool) in [lo, hi]."""
    if lo is not None and hi is not None:
        expect = f"an int in [{lo}, {hi}]"
    elif lo is not None:
        expect = "a positive int" if lo == 1 else f"an int >= {lo}"
    else:
        expect = "an int"
    return Rule(
        expect,
        lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi),
        optional,
    )


def Num(
    lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False, optional=False
) -> Rule:
    """A finite int or float in the interval given (open ends where said)."""
    if lo is not None and hi is not None:
        expect = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        expect = f"a number {'>' if lo_open else '>='} {lo}"
    else:
        expect = "a number"

    def test(v: Any) -> bool:
        if not _is_num(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return hi is None or (v < hi if hi_open else v <= hi)

    return Rule(expect, test, optional)


def Bool(*, optional: bool = False) -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool), optional)


def Str(*, optional: bool = False) -> Rule:
    return Rule("a non-empty string", _is_str, optional)


def Choice(*choices: Any) -> Rule:
    """One of ``choices`` (compared with their type: 8.0 is not the choice 8, true is not 1)."""
    optional = None in choices
    real = [c for c in choices if c is not None]
    return Rule(
        f"one of {real}",
        lambda v: any(type(v) is type(c) and v == c for c in real),
        optional,
    )


def Pair(*, optional: bool = False) -> Rule:
    """An (h, w) size: one positive int for a square, or [h, w] of positive ints."""
    return Rule(
        "an int or [h, w] of positive ints",
        lambda v: (
            (_is_int(v) and v >= 1)
            or (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v))
        ),
        optional,
    )


def Seq(length: int | None, item: Rule, expect: str, extra=None, *, optional: bool = False) -> Rule:
    """A list (of ``length`` items, or non-empty) whose items follow ``item``, and ``extra(list)``."""

    def test(v: Any) -> bool:
        if not isinstance(v, (list, tuple)) or (len(v) != length if length is not None else not v):
            return False
        return all(item.test(x) for x in v) and (extra is None or extra(v))

    return Rule(expect, test, optional)


def Map(spec: Mapping[str, Rule] | None = None, *, optional: bool = False) -> Rule:
    """A mapping with string keys (``spec``: the table its keys follow)."""
    return Rule(
        "a mapping (key: value)",
        lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
        optional,
        spec,
    )


def _device(v: Any) -> bool:
    import torch

    if not _is_str(v):
        return False
    try:
        torch.device(v)
    except (RuntimeError, ValueError):
        return False
    return True


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


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _bad(path: str, expect: str, value: Any) -> str:
    return f"config key {path!r} must be {expect}, got {_show(value)}"


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
def check_mapping(
    given: Mapping[str, Any], spec: Mapping[str, Rule], prefix: str, *, what: str = "config key"
) -> None:
    """Every key of ``given`` known to ``spec`` and valid by its rule; ``prefix`` is the key path so far."""
    for key, value in given.items():
        if key not in spec:
            raise ConfigError(_unknown_msg(key, prefix, spec, what=what))
        spec[key].check(prefix + str(key), value)


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


# -- the model section --------------------------------------------------------------------------
def check_model_config(model: Mapping[str, Any], prefix: str = "model.") -> None:
    """Check a segmentor config (the ``model`` section) before anything is built: every key's type and
    range (:data:`MODEL_SPEC`), the backbone against timm, the head and blocks against the registry,
    and every ``*_kwargs`` against the constructor it goes to (names, annotated types, then a build on
    the meta device, which allocates nothing). ``prefix`` starts every key path in the messages."""
    from ..models.segmentor import DEFAULT_CONFIG

    Map().check(prefix.rstrip(".") or "model", model)
    check_mapping(model, MODEL_SPEC, prefix, what="segmentor config key")
    cfg = {**DEFAULT_CONFIG, **model}
    for key in ("backbone_kwargs", "backbone_attn_kwargs", "head_kwargs", "attn_kwargs", "aux_kwargs"):
        cfg[key] = dict(cfg[key] or {})
    _check_backbone(cfg, prefix)
    _check_heads(cfg, prefix)


def _unknown_block(path: str, name: str) -> ConfigError:
    from ..registry import list_attns

    close = difflib.get_close_matches(name, list_attns(), n=5, cutoff=0.5)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return ConfigError(
        f"config key {path!r}: unknown attention block {name!r}{hint}; see visattn.list_attns()"
    )


def _check_backbone(cfg: Mapping[str, Any], prefix: str) -> None:
    import timm

    from ..registry import attn_class, list_attns

    name = cfg["backbone"]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(
            f"config key '{prefix}backbone': unknown timm model {name!r}{hint}; see timm.list_models()"
        )
    block = cfg["backbone_attn"]
    if block is None:
        if cfg["backbone_attn_kwargs"]:
            raise ConfigError(
                f"config key '{prefix}backbone_attn_kwargs' is only used with {prefix}backbone_attn "
                "(a block inserted into the backbone); set that or remove the kwargs"
            )
        return
    if block not in list_attns():
        raise _unknown_block(prefix + "backbone_attn", block)
    _check_kwargs(
        cfg["backbone_attn_kwargs"],
        prefix + "backbone_attn_kwargs",
        attn_class(block),
        f"block {block!r}",
        skip={"channels", "device", "dtype"},
    )


def _check_heads(cfg: Mapping[str, Any], prefix: str) -> None:
    from ..models.heads import HEADS, AttnHead, FCNHead
    from ..models.segmentor import AUX_DEFAULTS
    from ..registry import attn_class, create_attn, list_attns

    head, attn = cfg["head"], cfg["attn"]
    blocks = list_attns()
    if head == "attn":
        if attn is None:
            raise ConfigError(
                f"config key '{prefix}attn' must name a block (visattn.list_attns()) for head 'attn'"
            )
        if attn not in blocks:
            raise _unknown_block(prefix + "attn", attn)
        block = attn
    elif head in HEADS:
        if attn is not None:
            raise ConfigError(
                f"config key '{prefix}attn' is only used with head 'attn', not with head {head!r}; "
                f"remove it, or set {prefix}head=attn"
            )
        block = None
    elif head in blocks:
        if attn is not None and attn != head:
            raise ConfigError(
                f"config key '{prefix}attn' ({attn!r}) contradicts {prefix}head ({head!r}, a block "
                f"used as the head); set {prefix}head=attn and {prefix}attn, or remove {prefix}attn"
            )
        block = head
    else:
        close = difflib.get_close_matches(head, sorted({*HEADS, *blocks}), n=5, cutoff=0.5)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(
            f"config key '{prefix}head': unknown head {head!r}{hint}; a head is one of {sorted(HEADS)} "
            "or a block of visattn.list_attns()"
        )
    if block is None and cfg["attn_kwargs"]:
        raise ConfigError(
            f"config key '{prefix}attn_kwargs' is only used with a block head (head 'attn' or a block "
            f"name), not with head {head!r}; remove it"
        )
    head_cls = AttnHead if block is not None else HEADS[head]
    owned = {"in_channels", "num_classes", "attn", "attn_kwargs", "block", "device", "dtype"}
    _check_kwargs(
        cfg["head_kwargs"],
        prefix + "head_kwargs",
        head_cls,
        f"head {head!r} ({head_cls.__name__})",
        skip=owned,
    )
    head_kwargs = {"dropout": cfg["dropout"], **cfg["head_kwargs"]}
    if block is not None:
        _check_kwargs(
            cfg["attn_kwargs"],
            prefix + "attn_kwargs",
            attn_class(block),
            f"block {block!r}",
            skip={"channels", "device", "dtype"},
        )
        channels = head_kwargs.get("channels", _default_of(head_cls, "channels", 512))
        _build_on_meta(
            [(prefix + "attn_kwargs", cfg["attn_kwargs"]), (prefix + "head_kwargs", cfg["head_kwargs"])],
            f"block {block!r} with channels={channels}",
            lambda: create_attn(block, channels, **cfg["attn_kwargs"]),
        )
        head_kwargs.update(attn=block, attn_kwargs=cfg["attn_kwargs"])
    # in_channels comes from the backbone at build time; any valid width shows the head's own errors.
    _build_on_meta(
        [(prefix + "head_kwargs", cfg["head_kwargs"])],
        f"head {head!r}",
        lambda: head_cls(64, num_classes=cfg["num_classes"], **head_kwargs),
    )
    if cfg["aux"]:
        _check_kwargs(cfg["aux_kwargs"], prefix + "aux_kwargs", FCNHead, "the auxiliary FCNHead", skip=owned)
        aux_kwargs = {**AUX_DEFAULTS, "dropout": cfg["dropout"], **cfg["aux_kwargs"]}
        _build_on_meta(
            [(prefix + "aux_kwargs", cfg["aux_kwargs"])],
            "the auxiliary FCNHead",
            lambda: FCNHead(64, num_classes=cfg["num_classes"], **aux_kwargs),
        )


def _init_params(cls: type) -> tuple[dict[str, Any], bool]:
    """{keyword: type hint or None} a class's constructor accepts, following ``**kwargs`` up the MRO to
    the first closed ``__init__``; and whether the chain stays open (then any keyword may be valid)."""
    import torch.nn as nn

    params: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            return params, True
        init = vars(klass).get("__init__")
        if init is None:
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an annotation that does not evaluate: names are still checked
            hints = {}
        open_ended = False
        for name, p in list(inspect.signature(init).parameters.items())[1:]:
            if p.kind is p.VAR_KEYWORD:
                open_ended = True
            elif p.kind is not p.VAR_POSITIONAL:
                params.setdefault(name, hints.get(name))
        if not open_ended:
            return params, False
    return params, True


def _default_of(cls: type, name: str, fallback: Any) -> Any:
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is not None:
            p = inspect.signature(init).parameters.get(name)
            if p is not None and p.default is not p.empty:
                return p.default
    return fallback


def _check_kwargs(kwargs: Mapping[str, Any], path: str, cls: type, owner: str, *, skip: set[str]) -> None:
    """Each keyword a parameter of ``cls``'s constructor (not one the segmentor sets itself, ``skip``)
    and of its annotated type."""
    params, open_ended = _init_params(cls)
    valid = sorted(k for k in params if k not in skip)
    for key, value in kwargs.items():
        if key in skip and key in params:
            raise ConfigError(
                f"config key '{path}.{key}' is set by the segmentor itself, not through {path}; remove it"
            )
        if key not in params:
            if open_ended:
                continue
            close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise ConfigError(
                f"config key '{path}.{key}': {owner} has no parameter {key!r}{hint}; valid: {valid}"
            )
        if not matches_hint(value, params[key]):
            raise ConfigError(
                _bad(
                    f"{path}.{key}",
                    f"{describe_hint(params[key]).replace('None', 'null')} (as {owner} declares it)",
                    value,
                )
            )


def _build_on_meta(
    sources: Sequence[tuple[str, Mapping[str, Any]]], owner: str, build: Callable[[], Any]
) -> None:
    """Run a constructor on the meta device so its own hyperparameter checks (ValueError, TypeError)
    surface now, named by the config key, instead of after the backbone is built or data is loaded.

    ``sources`` are the (key path, kwargs) the constructor's arguments come from; the error is put on
    the first keyword its message names, else on the first path."""
    import torch

    try:
        with torch.device("meta"):
            build()
        return
    except Exception:  # noqa: S110 - some inits compute on their weights (.item()): see below
        pass
    try:
        # A real build decides; fork_rng keeps the global RNG as it was, so the model built later
        # gets the same initial weights as without this check.
        with torch.random.fork_rng(devices=[]):
            build()
    except Exception as err:  # caused by these values: a config error, named by its key
        msg = str(err) if isinstance(err, (ValueError, TypeError)) else f"{type(err).__name__}: {err}"
        key = sources[0][0]
        for path, kwargs in sources:
            named = [
                k for k in sorted(kwargs, key=len, reverse=True) if re.search(rf"\b{re.escape(k)}\b", msg)
            ]
            if named:
                key = f"{path}.{named[0]}"
                break
        raise ConfigError(f"config key {key!r}: {owner} cannot be built: {msg}") from None


def _unknown_msg(key: str, prefix: str, valid: Mapping[str, Any], *, what: str = "config key") -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
    return f"unknown {what} {prefix + str(key)!r}{hint}; valid keys: {sorted(prefix + k for k in valid)}"
