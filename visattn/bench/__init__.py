"""Measuring blocks: FLOPs, activation memory, time, scaling."""

# First: it must be in place before .runner imports torch.utils.benchmark.
from . import _quiet  # noqa: F401
from .measure import FLOP_MAPPING, count_flops, growth_exponent, saved_activation_bytes
from .runner import BenchRow, bench_block, fit_exponents, run_sweep

__all__ = [
    "FLOP_MAPPING",
    "BenchRow",
    "bench_block",
    "count_flops",
    "fit_exponents",
    "growth_exponent",
    "run_sweep",
    "saved_activation_bytes",
]
