"""Benchmark rows (dataclasses) to and from JSON and CSV, written atomically: one implementation for every
table the bench writes (versus dense, eager vs compiled)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..atomic import atomic_write_text

__all__ = ["write_rows_json", "write_rows_csv", "read_rows_json", "replace_generated_section"]

Row = TypeVar("Row")


def write_rows_json(rows: Sequence[Any], path: str | Path, meta: dict | None = None) -> None:
    """``{"meta": {torch version, **meta}, "rows": [...]}`` as JSON, written atomically."""
    payload = {"meta": {"torch": torch.__version__, **(meta or {})}, "rows": [asdict(r) for r in rows]}
    atomic_write_text(path, json.dumps(payload, indent=1, default=str))


def write_rows_csv(rows: Sequence[Any], row_type: type, path: str | Path) -> None:
    """Rows as CSV, one column per field of the dataclass ``row_type``, written atomically."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(row_type.__dataclass_fields__))
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    atomic_write_text(path, buf.getvalue())


def read_rows_json(path: str | Path, row_type: type[Row], error: str) -> tuple[dict, list[Row]]:
    """(meta, rows) of a file written by :func:`write_rows_json`; otherwise a ValueError whose message is
    ``error`` formatted with ``path`` and ``cause``."""
    try:
        data = json.loads(Path(path).read_text())
        return data["meta"], [row_type(**r) for r in data["rows"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(error.format(path=path, cause=f"{type(err).__name__}: {err}")) from err


def replace_generated_section(text: str, body: str, begin: str, end: str, what: str) -> str:
    """``text`` with the part between the markers ``begin`` and ``end`` replaced by ``body`` (appended with its
    markers when absent), so a page's hand-written and other generated parts stay as they are. Markers present
    but broken (one missing, or out of order) are a ValueError naming ``what`` wrote them, not a guess."""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    start, stop = text.find(begin), text.find(end)
    if start == -1 and stop == -1:
        return text.rstrip() + "\n\n" + block + "\n"
    if start == -1 or stop < start:
        raise ValueError(
            f"{what}: the page has a broken generated section (markers {begin!r} / {end!r} missing or out of "
            "order); restore both markers or delete what is left of them"
        )
    return text[:start] + block + text[stop + len(end) :]
