"""The one rule for numerically sensitive steps (softmax normalisers, Sinkhorn balancing, accumulations):
compute in at least float32, never below the input's precision.

Half types (float16, bfloat16, the float8 types) are upcast to float32 because their 8- to 11-bit mantissas
make those steps noise; float32 and float64 are left as they are. A bare ``.float()`` would do the first
and silently demote float64, which is how users check gradients (``torch.autograd.gradcheck``) and
compare against references.
"""

from __future__ import annotations

import torch

__all__ = ["accuracy_dtype", "upcast_for_accuracy"]


def accuracy_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a sensitive step on ``dtype`` data runs in: float32 for half (and integer or bool)
    types, ``dtype`` itself for float32 and float64 (complex types keep at least complex64)."""
    if dtype.is_floating_point and dtype.itemsize < 4:
        return torch.float32  # torch has no promotion rule for the float8 types
    return torch.promote_types(dtype, torch.float32)


def upcast_for_accuracy(t: torch.Tensor) -> torch.Tensor:
    """``t`` in :func:`accuracy_dtype` of its dtype: half types become float32, float32 and float64 come
    back unchanged (the same tensor, no copy). Differentiable; cast the result back to the input's dtype
    where the step's output must match it."""
    return t.to(accuracy_dtype(t.dtype))
