"""Chunk length of the causal linear-attention and delta-rule scans: time and FLOPs per chunk size.

The scans (:func:`visattn.layers.linear_attention.causal_linear_scan`,
:func:`visattn.layers.delta_rule.delta_rule`) give the same result for every chunk length L; L trades
the quadratic work inside a chunk (N·L·D) against the number of sequential steps and small state
products between chunks (N/L of them). Which L is fastest depends on the device, so
:func:`sweep_chunk_sizes` measures it and :func:`visattn.layers.linear_attention.default_chunk_size`
holds the choice. ``tools/gpu_sweep.py`` calls the sweep on the accelerator; on the CPU::

    OMP_NUM_THREADS=1 python -m visattn.bench.chunks --tokens 4096 --batch-heads 4
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..layers.delta_rule import delta_rule
from ..layers.linear_attention import default_chunk_size, linear_attention
from .measure import FLOP_MAPPING
from .runner import interleaved_times, time_ms

__all__ = ["sweep_chunk_sizes", "format_chunk_rows"]

KINDS = ("linear", "delta")


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"sweep_chunk_sizes: {what} must be a positive int, got {value!r}")
    return value


def _case(
    kind: str, chunk: int, tokens: int, batch_heads: int, head_dim: int, device: torch.device, dtype
) -> Callable[[], object]:
    """A closure running forward + backward of one scan at chunk length ``chunk``.

    Inputs come from a fixed seed and look like what the blocks feed the scans: positive features
    (elu + 1) for linear attention; sum-normalised positive keys and queries and write strengths in
    (0, 1) for the delta rule (so the recurrence is a contraction, as in DPFP). Both run through the
    public functions, so a half-precision ``dtype`` is promoted to float32 there, as in the blocks.
    """
    gen = torch.Generator().manual_seed(0)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).requires_grad_()

    shape = (batch_heads, tokens, head_dim)
    if kind == "linear":
        q, k = (leaf(F.elu(torch.randn(shape, generator=gen)) + 1) for _ in range(2))
        inputs = (q, k, leaf(torch.randn(shape, generator=gen)))

        def forward() -> torch.Tensor:
            return linear_attention(*inputs, causal=True, normalize=False, chunk_size=chunk)
    else:
        q, k = (leaf(torch.randn(shape, generator=gen).softmax(-1)) for _ in range(2))
        v = leaf(torch.randn(shape, generator=gen))
        beta = leaf(torch.rand(batch_heads, tokens, generator=gen))
        inputs = (q, k, v, beta)

        def forward() -> torch.Tensor:
            return delta_rule(*inputs, chunk_size=chunk)

    cotangent = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    def fwd_bwd() -> object:
        # autograd.grad, not backward(): nothing accumulates into .grad between timed calls
        return torch.autograd.grad(forward(), inputs, cotangent)

    return fwd_bwd


def sweep_chunk_sizes(
    *,
    device,
    dtype,
    sizes=(16, 32, 64, 128),
    tokens=16384,
    batch_heads=16,
    head_dim=32,
    rounds=3,
    min_time=0.02,
) -> list[dict]:
    """Forward+backward time and FLOPs of both causal scans at each chunk size, on ``device``.

    One row per (kind in ("linear", "delta"), chunk size), kinds in that order and sizes ascending,
    with keys ``kind, chunk_size, tokens, batch_heads, head_dim, dtype, device, fwd_bwd_ms, flops,
    tflops, is_default``. The scans run on ``batch_heads`` independent (tokens, head_dim) sequences
    (Dk = Dv = head_dim). ``is_default`` marks the size that
    :func:`visattn.layers.linear_attention.default_chunk_size` picks for this device, dtype and head
    dims; that size is swept even when ``sizes`` lacks it, so every kind has exactly one such row.

    Timing: :func:`visattn.bench.runner.time_ms` (torch.utils.benchmark, at least ``min_time`` s per
    measurement), in ``rounds`` rounds that each time every (kind, size) once, in forward order on even
    rounds and reversed on odd ones (the interleaving of :func:`visattn.bench.runner.interleaved_times`,
    so a change in machine load hits every size alike); ``fwd_bwd_ms`` is the median over rounds.
    ``flops`` counts one forward+backward with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls:
    the scans' work); ``tflops`` is flops / time.
    """
    device = torch.device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"sweep_chunk_sizes: dtype must be a floating torch.dtype, got {dtype!r}")
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes:
        raise ValueError(f"sweep_chunk_sizes: sizes must be a non-empty sequence of ints, got {sizes!r}")
    sizes = {_positive_int(s, "every chunk size") for s in sizes}
    for value, what in ((tokens, "tokens"), (batch_heads, "batch_heads"), (head_dim, "head_dim")):
        _positive_int(value, what)
    _positive_int(rounds, "rounds")
    if not (isinstance(min_time, (int, float)) and min_time > 0):
        raise ValueError(f"sweep_chunk_sizes: min_time must be a number of seconds > 0, got {min_time!r}")

    defaults = {kind: default_chunk_size(device, dtype, head_dim, head_dim, kind) for kind in KINDS}
    cases = [(kind, chunk) for kind in KINDS for chunk in sorted(sizes | {defaults[kind]})]
    fns = {case: _case(*case, tokens, batch_heads, head_dim, device, dtype) for case in cases}

    flops = {}
    for case, fn in fns.items():
        with FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING) as counter:
            fn()
        flops[case] = int(counter.get_total_flops())

    timings = [lambda fn=fns[case]: time_ms(fn, device, min_run_time=min_time) for case in cases]
    times = dict(zip(cases, interleaved_times(timings, rounds)))

    rows = []
    for kind, chunk in cases:
        ms = statistics.median(times[kind, chunk])
        rows.append(
            {
                "kind": kind,
                "chunk_size": chunk,
                "tokens": tokens,
                "batch_heads": batch_heads,
                "head_dim": head_dim,
                "dtype": str(dtype).removeprefix("torch."),
                "device": str(device),
                "fwd_bwd_ms": ms,
                "flops": flops[kind, chunk],
                "tflops": flops[kind, chunk] / (ms * 1e-3) / 1e12 if ms > 0 else float("nan"),
                "is_default": chunk == defaults[kind],
            }
        )
    return rows


def format_chunk_rows(rows: Sequence[dict]) -> str:
    """The rows of :func:`sweep_chunk_sizes` as a plain-text table, time relative to each kind's fastest."""
    best = {}
    for r in rows:
        best[r["kind"]] = min(best.get(r["kind"], float("inf")), r["fwd_bwd_ms"])
    lines = [
        f"{'kind':6} {'chunk':>5} {'fwd+bwd ms':>11} {'x fastest':>9} {'GFLOP':>8} {'TFLOP/s':>8}  default"
    ]
    for r in rows:
        lines.append(
            f"{r['kind']:6} {r['chunk_size']:>5} {r['fwd_bwd_ms']:>11.2f} "
            f"{r['fwd_bwd_ms'] / best[r['kind']]:>9.2f} {r['flops'] / 1e9:>8.2f} {r['tflops']:>8.4f}  "
            f"{'*' if r['is_default'] else ''}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m visattn.bench.chunks``: run the sweep and print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m visattn.bench.chunks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16", "bfloat16"))
    parser.add_argument("--sizes", default="16,32,64,128", help="comma-separated chunk sizes")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--batch-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.02)
    args = parser.parse_args(argv)
    rows = sweep_chunk_sizes(
        device=args.device,
        dtype=getattr(torch, args.dtype),
        sizes=tuple(int(s) for s in args.sizes.split(",")),
        tokens=args.tokens,
        batch_heads=args.batch_heads,
        head_dim=args.head_dim,
        rounds=args.rounds,
        min_time=args.min_time,
    )
    print(
        f"device={args.device} dtype={args.dtype} tokens={args.tokens} batch_heads={args.batch_heads} "
        f"head_dim={args.head_dim} threads={torch.get_num_threads()}"
    )
    print(format_chunk_rows(rows))


if __name__ == "__main__":
    main()
