"""Measuring blocks: FLOPs, activation memory, time, scaling."""

from .measure import FLOP_MAPPING, count_flops, growth_exponent, saved_activation_bytes

__all__ = ["FLOP_MAPPING", "count_flops", "growth_exponent", "saved_activation_bytes"]
