"""The block registry: one decorator that every block uses, and a thin factory over it.

A block is registered with the facts of its paper (``AttnInfo``); the capability fields of
``AttnInfo`` drive the conformance suite, so a block can only be exempted from a check by declaring
it here, never by a skip list in a test.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
from dataclasses import dataclass, fields
from typing import Any

import torch.nn as nn

from .layers.block import AttnBlock

__all__ = ["AttnInfo", "FAMILIES", "register_attn", "create_attn", "list_attns", "attn_info", "attn_class"]

FAMILIES = (
    "gate",
    "nonlocal",
    "structured2d",
    "linear",
    "lowrank",
    "sparse",
    "hashing",
    "clustering",
    "memory",
    "conv",
)

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_ARXIV_RE = re.compile(r"^\d{4}\.\d{4,5}$")


@dataclass(frozen=True)
class AttnInfo:
    """What a user needs to know to choose a block, and what the tests need to check it."""

    name: str
    title: str
    arxiv: str
    year: int
    family: str
    complexity: str
    flops_exponent: float
    native_2d: bool
    causal: bool
    identity_init: bool
    idea: str
    reference: str = "none"
    # Capability flags: read by the tests (and by `visattn export`), as segmentation_models_pytorch does.
    exportable: bool = True
    # With ``exportable``: the ONNX graph takes any H and W (False: exported at a fixed input size).
    export_dynamic_hw: bool = True
    # Why a block does not export, or only at a fixed size (required then; shown by `visattn export`
    # and docs/support.md).
    export_note: str = ""
    compile_fullgraph: bool = True
    # False for token-wise blocks (a memory lookup per pixel): their output depends on no other pixel.
    token_mixing: bool = True
    # True when every training forward draws fresh random numbers (hash rotations, sampled queries, random
    # search): its training output follows the global seed; eval mode is deterministic.
    random_in_training: bool = False
    # A deliberate surrogate backward (a stop-gradient or straight-through estimator the paper prescribes):
    # the parameter-name prefixes that still get the true gradient. Empty: every gradient is exact.
    surrogate_gradient_exact: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if not _NAME_RE.match(self.name):
            problems.append(f"name {self.name!r} must be lower-case letters, digits and '_'")
        if not _ARXIV_RE.match(self.arxiv):
            problems.append(f"arxiv {self.arxiv!r} must look like '1811.11721'")
        if self.family not in FAMILIES:
            problems.append(f"family {self.family!r} must be one of {FAMILIES}")
        if not 2015 <= int(self.year) <= 2100:
            problems.append(f"year {self.year!r} is implausible")
        if not 0.0 < float(self.flops_exponent) <= 3.0:
            problems.append(f"flops_exponent {self.flops_exponent!r} must be in (0, 3]")
        for flag in (
            "native_2d",
            "causal",
            "identity_init",
            "exportable",
            "export_dynamic_hw",
            "compile_fullgraph",
            "token_mixing",
            "random_in_training",
        ):
            if not isinstance(getattr(self, flag), bool):
                problems.append(f"{flag} must be a bool")
        if not isinstance(self.surrogate_gradient_exact, tuple) or not all(
            isinstance(p, str) and p for p in self.surrogate_gradient_exact
        ):
            problems.append("surrogate_gradient_exact must be a tuple of parameter-name prefixes")
        if not isinstance(self.export_note, str):
            problems.append("export_note must be a str")
        elif not (self.exportable and self.export_dynamic_hw) and not self.export_note.strip():
            problems.append("exportable=False or export_dynamic_hw=False needs an export_note saying why")
        if problems:
            raise ValueError(f"invalid AttnInfo for {self.name!r}: " + "; ".join(problems))


_REGISTRY: dict[str, tuple[type[nn.Module], AttnInfo]] = {}
_INFO_FIELDS = tuple(f.name for f in fields(AttnInfo) if f.name != "name")


def register_attn(name: str, **info: Any):
    """Class decorator: ``@register_attn("ccnet", title=..., arxiv=..., ...)``.

    Checks at import time that the class honours the block contract's constructor:
    ``channels`` first and positional, ``device``/``dtype`` keywords, and ``causal`` exactly when
    ``info['causal']`` is true.
    """
    unknown = sorted(set(info) - set(_INFO_FIELDS))
    if unknown:
        raise TypeError(
            f"register_attn({name!r}): unknown AttnInfo field(s) {unknown}; valid: {_INFO_FIELDS}"
        )
    record = AttnInfo(name=name, **info)

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if not issubclass(cls, AttnBlock):
            # AttnBlock is where arguments and inputs are checked (types, dtype, batch of one in training).
            raise TypeError(
                f"{cls.__qualname__}: a registered block must derive from visattn.layers.AttnBlock"
            )
        if name in _REGISTRY:
            raise ValueError(
                f"attention block {name!r} is already registered by {_REGISTRY[name][0].__qualname__}; "
                "choose another name"
            )
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        if not params or params[0].name != "channels":
            raise TypeError(f"{cls.__qualname__}: the first constructor argument must be `channels`")
        names = {p.name for p in params}
        missing = {"device", "dtype"} - names
        if missing:
            raise TypeError(f"{cls.__qualname__}: constructor must accept keyword(s) {sorted(missing)}")
        if record.causal != ("causal" in names):
            raise TypeError(
                f"{cls.__qualname__}: AttnInfo.causal={record.causal} but the constructor "
                f"{'lacks' if record.causal else 'has'} a `causal` argument"
            )
        cls.attn_name = name
        cls.attn_info = record
        _REGISTRY[name] = (cls, record)
        return cls

    return decorator


def _lookup(name: str) -> tuple[type[nn.Module], AttnInfo]:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise ValueError(
            f"unknown attention block {name!r}; {hint}see visattn.list_attns() for all {len(_REGISTRY)} names"
        ) from None


def attn_class(name: str) -> type[nn.Module]:
    """The registered class for ``name``."""
    return _lookup(name)[0]


def attn_info(name: str) -> AttnInfo:
    """The :class:`AttnInfo` of a registered block."""
    return _lookup(name)[1]


def create_attn(name: str, channels: int, **kwargs: Any) -> nn.Module:
    """Build the block ``name`` for a feature map with ``channels`` channels.

    Usable as timm's ``attn_layer``: ``functools.partial(visattn.create_attn, "cbam")``.
    Unknown names raise ValueError (with the closest names); unknown keywords raise TypeError naming
    the block and its accepted keywords; a value of the wrong type or out of range raises ValueError
    naming the block and the parameter (checked by :class:`~visattn.layers.AttnBlock`, so direct class
    use gets the same checks).
    """
    cls, _ = _lookup(name)
    accepted = [p for p in list(inspect.signature(cls.__init__).parameters)[2:]]
    bad = sorted(set(kwargs) - set(accepted))
    if bad:
        raise TypeError(
            f"{name} ({cls.__name__}) got unexpected keyword argument(s) {bad}; it accepts {accepted}"
        )
    return cls(channels, **kwargs)


def list_attns(
    filter: str = "*", *, causal: bool | None = None, native_2d: bool | None = None, vit: bool | None = None
) -> list[str]:
    """Sorted registered names matching the fnmatch pattern ``filter`` and the optional flags
    (``vit``: runs as the attention of a timm ViT, :data:`visattn.models.vit.MIXERS`)."""
    if vit is not None:
        from .models.vit import MIXERS  # the capability table lives with the ViT adapter

        return [n for n in list_attns(filter, causal=causal, native_2d=native_2d) if (n in MIXERS) == vit]
    out = []
    for name, (_, info) in _REGISTRY.items():
        if not fnmatch.fnmatchcase(name, filter):
            continue
        if causal is not None and info.causal != causal:
            continue
        if native_2d is not None and info.native_2d != native_2d:
            continue
        out.append(name)
    return sorted(out)
