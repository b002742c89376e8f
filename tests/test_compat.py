"""visattn.layers.compat.is_exporting: False in eager and under torch.compile, True under torch.export (strict and
not); and no block asks torch.compiler.is_exporting() itself (it is True under torch.compile of torch 2.11)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from visattn.layers.compat import is_exporting


class _Probe(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1 if is_exporting() else x - 1


def test_is_exporting_in_eager_compile_and_export():
    x = torch.zeros(2)
    assert not is_exporting()
    assert _Probe()(x).tolist() == [-1, -1]
    torch._dynamo.reset()
    assert torch.compile(_Probe(), backend="eager", fullgraph=True)(x).tolist() == [-1, -1]
    for strict in (False, True):
        exported = torch.export.export(_Probe(), (x,), strict=strict)
        assert exported.module()(x).tolist() == [1, 1], f"strict={strict}"


def test_no_module_asks_torch_directly():
    root = Path(__file__).resolve().parents[1] / "visattn"
    direct = [
        f"{p.relative_to(root)}:{i}"
        for p in root.rglob("*.py")
        if p.name != "compat.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"torch\.compiler\.is_exporting\(", line)
    ]
    assert not direct, (
        f"use visattn.layers.compat.is_exporting instead of torch's (see its docstring): {direct}"
    )
