"""Measuring blocks: FLOPs, activation memory, time, scaling."""

# First: it must be in place before .runner imports torch.utils.benchmark.
from . import _quiet  # noqa: F401
from .measure import FLOP_MAPPING, count_flops, growth_exponent, saved_activation_bytes
from .runner import BenchRow, bench_block, fit_exponents, run_sweep
from .vs_dense import DenseAttention, DenseRatio, find_crossover, measure_vs_dense, sweep_vs_dense

__all__ = [
    "FLOP_MAPPING",
    "BenchRow",
    "DenseAttention",
    "DenseRatio",
    "bench_block",
    "count_flops",
    "find_crossover",
    "fit_exponents",
    "growth_exponent",
    "measure_vs_dense",
    "run_sweep",
    "saved_activation_bytes",
    "sweep_vs_dense",
]
