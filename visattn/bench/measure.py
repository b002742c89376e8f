"""Deterministic measurements: FLOPs, saved-activation bytes, growth exponents.

``torch.utils.flop_counter`` has no formula for the CPU flash-attention kernel that
``scaled_dot_product_attention`` dispatches to, so it would count SDPA as free on CPU; the mapping
below adds it (forward and backward) with the library's own SDPA formulas.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter as _fc

__all__ = ["count_flops", "saved_activation_bytes", "growth_exponent", "FLOP_MAPPING"]


def _cpu_flash_fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(query, key, value)


def _cpu_flash_bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_backward_flop_count(grad_out, query, key, value)


FLOP_MAPPING: dict[Any, Callable[..., int]] = {}
_aten = torch.ops.aten
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
    FLOP_MAPPING[_aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_fwd
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    FLOP_MAPPING[_aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_bwd


def count_flops(fn: Callable[..., Any], *args: Any, backward: bool = False, **kwargs: Any) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` (and of its backward with ``backward=True``)."""
    with _fc.FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING) as counter:
        out = fn(*args, **kwargs)
        if backward:
            out.float().sum().backward()
    return int(counter.get_total_flops())


def saved_activation_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Bytes that autograd holds for backward once ``fn(*args, **kwargs)`` has returned (its output alive).

    Parameters of ``fn`` (when it is a module) and of module arguments are not activations and are
    excluded; each distinct storage is counted once, so views of one tensor are not double-counted.
    Saved tensors are followed by weak reference and counted after the call: a tensor saved by a node
    that the forward itself dropped is not an activation, and counting by address while the forward
    runs would make the total depend on whether the allocator reuses its address (run-to-run noise).
    """
    modules = [m for m in (fn, *args) if isinstance(m, torch.nn.Module)]
    params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        # A detached alias (same storage): packing ``t`` itself would make a node that saves its own
        # output (exp, sigmoid, softmax) hold that output and, through its grad_fn, itself: a cycle of
        # autograd nodes that Python's collector cannot free, so every call leaked its activations
        # (tools/vit_speed.py reached 20 GiB and was killed).
        held = t.detach()
        saved.append(weakref.ref(held))
        return held

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    held: dict[int, int] = {}
    for ref in saved:
        t = ref()
        if t is not None:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                held[storage.data_ptr()] = storage.nbytes()
    del out
    return sum(held.values())


def growth_exponent(sizes: list[float], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(size)."""
    if len(sizes) != len(values) or len(sizes) < 2:
        raise ValueError("growth_exponent needs at least two (size, value) pairs of equal length")
    if min(values) <= 0 or min(sizes) <= 0:
        raise ValueError(f"growth_exponent needs positive sizes and values, got {sizes} and {values}")
    xs = [math.log(s) for s in sizes]
    ys = [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
