"""Values against constructor annotations: one reading of ``int``, ``float``, ``X | None``, tuples and
literals, shared by the blocks' argument check (:mod:`visattn.layers.block`) and the config checker
(:mod:`visattn.engine.config`), so a hyperparameter is judged the same from Python and from YAML."""

from __future__ import annotations

import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["describe_hint", "matches_hint"]


def matches_hint(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint``: bool is not an int, an int is a float, a list
    fits a tuple or sequence annotation (YAML has no tuples), a literal needs its exact type; kinds of
    annotation not listed here accept anything (the constructor judges those)."""
    if hint is None or hint is type(None):
        return value is None
    if hint is Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_hint(value, h) for h in args)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (tuple, list, Sequence):
        if not isinstance(value, (tuple, list)):
            return False
        if not args:
            return True
        if origin is not tuple or (len(args) == 2 and args[1] is Ellipsis):
            return all(matches_hint(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches_hint(v, h) for v, h in zip(value, args, strict=True))
    if hint is dict or origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def describe_hint(hint: Any) -> str:
    """The annotation in words for an error message (``int or None``, ``tuple[int, int]``)."""
    if hint is None or hint is type(None):
        return "None"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe_hint(h) for h in typing.get_args(hint))
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")
