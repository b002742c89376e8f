"""The config checker's vocabulary: a :class:`Rule` per key (type, shape, range, in words for the error)
built with :func:`Int`, :func:`Num`, :func:`Pair`, :func:`Seq`, :func:`Map`..., and :func:`check_mapping`,
which walks a table of rules and raises :class:`ConfigError` naming the full key path."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import VisattnError

__all__ = [
    "Bool",
    "Choice",
    "ConfigError",
    "Int",
    "Map",
    "Num",
    "Pair",
    "Rule",
    "Seq",
    "Str",
    "check_mapping",
]


class ConfigError(VisattnError, ValueError):
    """A bad config value; the message names the key."""


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


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _bad(path: str, expect: str, value: Any) -> str:
    return f"config key {path!r} must be {expect}, got {_show(value)}"


def check_mapping(
    given: Mapping[str, Any], spec: Mapping[str, Rule], prefix: str, *, what: str = "config key"
) -> None:
    """Every key of ``given`` known to ``spec`` and valid by its rule; ``prefix`` is the key path so far."""
    for key, value in given.items():
        if key not in spec:
            raise ConfigError(_unknown_msg(key, prefix, spec, what=what))
        spec[key].check(prefix + str(key), value)


def _unknown_msg(key: str, prefix: str, valid: Mapping[str, Any], *, what: str = "config key") -> str:
    close = difflib.get_close_matches(str(key), list(valid), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
    return f"unknown {what} {prefix + str(key)!r}{hint}; valid keys: {sorted(prefix + k for k in valid)}"
