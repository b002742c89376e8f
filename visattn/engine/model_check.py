"""The ``model`` section (a segmentor config) checked before anything is built: every key by
:data:`visattn.engine.config.MODEL_SPEC`, the backbone against timm, the head and blocks against the
registry, and each ``*_kwargs`` against the constructor it feeds (names, annotated types, then a build on
the meta device)."""

from __future__ import annotations

import difflib
import inspect
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..annotations import describe_hint, matches_hint
from .config_rules import ConfigError, Map, _bad, check_mapping

__all__ = ["check_model_config"]


def check_model_config(model: Mapping[str, Any], prefix: str = "model.") -> None:
    """Check a segmentor config (the ``model`` section) before anything is built: every key's type and
    range (:data:`MODEL_SPEC`), the backbone against timm, the head and blocks against the registry,
    and every ``*_kwargs`` against the constructor it goes to (names, annotated types, then a build on
    the meta device, which allocates nothing). ``prefix`` starts every key path in the messages."""
    from ..models.segmentor import DEFAULT_CONFIG
    from .config import MODEL_SPEC

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
