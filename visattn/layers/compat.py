"""Version differences of torch that visattn's code paths depend on, answered in one place.

``is_exporting``: the blocks choose export-friendly formulations (always pad, unbacked counts, functional
decompositions for ONNX) only while ``torch.export`` traces them. ``torch.compiler.is_exporting()`` says so on
current torch, but under ``torch.compile`` of torch 2.11 (the version on the project's GPU machines) dynamo
answers True for it, so every compiled model took the export paths: slower, and isa did not compile fullgraph
at all (a data-dependent guard on the unbacked group count). The module flag that function reads is traced as a
guarded constant by every version checked (2.11, 2.14): False under torch.compile, True under torch.export
(strict and non-strict). Reading it directly is private API, hence this one place and its test
(tests/test_compat.py), which fails if a torch release drops or changes it.
"""

from __future__ import annotations

import torch

__all__ = ["is_exporting"]


def is_exporting() -> bool:
    """True only while ``torch.export`` traces (not under ``torch.compile``, not in eager)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)
