"""Every block against dense multi-head attention at the same batch, channels, heads, dtype and size.

The reference is :class:`DenseAttention`: ``x + MHSA(x)`` over all H·W tokens with
:class:`visattn.layers.attention.MultiHeadAttention` (linear q/k/v, multi-head SDPA, output projection).
The ``nonlocal`` block is not used as the reference although it is dense: it is one head of C/2
channels with 1x1 convolutions and a BatchNorm, so it does half the attention FLOPs of a C-wide
multi-head layer and would flatter dense; the reference here has the block's own head count.

Timing is a ratio measured in one run: each round times the block and the reference back to back
(alternating which goes first, so a load change hits both alike) and the reported ratio is the median
over rounds of (block / dense in the same round). Saved-activation memory is deterministic
(:func:`visattn.bench.saved_activation_bytes`). The crossover is the smallest square side of a grid
from which on the block is faster than dense at every larger side of the grid. On request
(``count_flops=True``; the GPU sweep asks, the CPU docs run does not) a row also carries the FLOPs of
one forward+backward of block and dense, counted once outside the timing, and the fraction of the same
run's matmul throughput that each achieves.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils import benchmark

from ..layers import to_map, to_tokens
from ..layers.attention import MultiHeadAttention, default_heads, resolve_heads
from ..registry import attn_info, create_attn
from .measure import count_flops as _count_flops
from .measure import saved_activation_bytes
from .rows_io import read_rows_json, replace_generated_section, write_rows_csv, write_rows_json
from .runner import _progress, _sync, interleaved_times

__all__ = [
    "DenseAttention",
    "DenseRatio",
    "block_heads",
    "forward_backward_flops",
    "interleaved_ratio",
    "find_crossover",
    "flops_key",
    "crossovers",
    "measure_vs_dense",
    "sweep_vs_dense",
    "format_vs_dense",
    "markdown_vs_dense",
    "replace_section",
    "machine_description",
    "write_vs_dense_json",
    "write_vs_dense_csv",
    "read_vs_dense_json",
]


class DenseAttention(nn.Module):
    """Dense multi-head softmax attention over all H·W tokens of a (B, C, H, W) map, with a residual.

    Args:
        channels: C, also the attention width (no reduction).
        heads: number of heads (default: :func:`visattn.layers.attention.default_heads`).
    """

    def __init__(self, channels: int, *, heads: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.heads = resolve_heads(channels, heads, "dense")
        # Not zero-initialised: the reference should carry gradients into every projection, as a
        # trained layer does (the cost of backward is the same either way).
        self.attn = MultiHeadAttention(channels, self.heads, zero_init_out=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return x + to_map(self.attn(to_tokens(x)), h, w)


def block_heads(block: nn.Module, channels: int) -> int:
    """The head count a block runs with (its ``heads`` attribute), else the library's default for C."""
    heads = getattr(block, "heads", None)
    if isinstance(heads, int) and not isinstance(heads, bool) and heads >= 1 and channels % heads == 0:
        return heads
    return default_heads(channels)


@dataclass
class DenseRatio:
    """One block at one size against dense attention in the same run (ratios < 1: the block wins)."""

    name: str
    batch: int
    channels: int
    height: int
    width: int
    dtype: str
    device: str
    mode: str  # "eager" or "compiled"
    heads: int
    rounds: int
    block_ms: float  # median forward+backward time over rounds
    dense_ms: float
    time_ratio: float  # median over rounds of block / dense in the same round
    block_saved_mib: float
    dense_saved_mib: float
    memory_ratio: float
    status: str = "ok"
    first_call_s: float = math.nan  # one forward+backward of the block before timing (sizes the work)
    # Work and throughput (NaN unless counted: ``count_flops=True``). FLOPs of one forward+backward
    # (FlopCounterMode; pattern blocks on the engine's reference path, see :func:`forward_backward_flops`).
    block_flops: float = math.nan
    dense_flops: float = math.nan
    matmul_tflops: float = math.nan  # dense matmul TFLOP/s of this dtype, measured in the same run
    block_tflops: float = math.nan  # block_flops / block_ms
    dense_tflops: float = math.nan
    block_matmul_fraction: float = math.nan  # block_tflops / matmul_tflops
    dense_matmul_fraction: float = math.nan
    flops_note: str = ""  # why the FLOPs are missing when counting was asked for and failed


def interleaved_ratio(
    time_block: Callable[[], float], time_dense: Callable[[], float], rounds: int
) -> tuple[float, float, float]:
    """(median block time, median dense time, median per-round ratio block / dense).

    Even rounds time the block first, odd rounds dense first, so a drift in machine load inside a
    round does not always favour the same side. The ratio is the median of per-round ratios (not the
    ratio of medians): each round's pair shares one machine state.
    """
    if rounds < 1:
        raise ValueError(f"vs-dense: rounds must be >= 1, got {rounds}")
    tb, td = interleaved_times([time_block, time_dense], rounds)
    ratios = [b / d if d > 0 else math.nan for b, d in zip(tb, td)]
    return statistics.median(tb), statistics.median(td), statistics.median(ratios)


def find_crossover(ratio_at: Callable[[int], float], grid: Iterable[int]) -> int | None:
    """Smallest side s of ``grid`` such that the block is faster than dense (ratio < 1) at s and at every
    larger side of the grid; None when it is not faster at the largest side.

    ``ratio_at`` is called lazily from the largest side down and not past the first side where the
    block loses, so an expensive measurement is only made where it can change the answer. A ratio
    that is NaN (a failed measurement) counts as not faster.
    """
    sides = sorted(set(grid))
    if not sides:
        raise ValueError("vs-dense: the crossover needs a non-empty grid of square sides")
    found = None
    for side in reversed(sides):
        ratio = ratio_at(side)
        if not ratio < 1.0:
            break
        found = side
    return found


def crossovers(rows: Sequence[DenseRatio]) -> dict[tuple[str, str, str], int | None]:
    """Crossover per (block, dtype, mode) over the square sizes present in ``rows``."""
    groups: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in rows:
        if r.height == r.width:
            ratio = r.time_ratio if r.status == "ok" else math.nan
            groups.setdefault((r.name, r.dtype, r.mode), {})[r.height] = ratio
    return {key: find_crossover(ratios.__getitem__, ratios) for key, ratios in groups.items()}


def forward_backward_flops(model: Callable[[torch.Tensor], object], x: torch.Tensor) -> int:
    """FLOPs of one forward+backward of ``model`` on ``x`` (torch.utils.flop_counter.FlopCounterMode).

    Pattern blocks are counted on the sparse-pattern engine's reference path whatever backend their
    timed calls use: torch's formula for FlexAttention counts a block-sparse call as attention over
    every key, which would credit a pattern block with the work its mask skips (and inflate its
    throughput by the inverse of the pattern's density). The reference path does the gathered key
    tiles, i.e. the pattern's own work plus the few masked slots of partial tiles. Gradients
    accumulate into ``x`` and the parameters as in the timed calls.
    """
    from ..layers.sparse_pattern import backend

    def call() -> torch.Tensor:
        out = model(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    with backend("reference"):
        return _count_flops(call, backward=True)


def _set_rates(row: DenseRatio) -> None:
    """Achieved TFLOP/s and fractions of the matmul rate from the row's FLOPs and times (NaN where unknown)."""
    for side in ("block", "dense"):
        flops, ms = getattr(row, f"{side}_flops"), getattr(row, f"{side}_ms")
        tflops = flops / (ms * 1e-3) / 1e12 if ms > 0 else math.nan  # NaN stays NaN
        setattr(row, f"{side}_tflops", tflops)
        rate = row.matmul_tflops
        setattr(row, f"{side}_matmul_fraction", tflops / rate if rate > 0 else math.nan)


def _benchmark_ms(fn: Callable[[], object], number: int) -> float:
    """Mean ms per call of ``number`` calls of ``fn`` (torch.utils.benchmark's ``timeit``)."""
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).timeit(number).median * 1e3


def measure_vs_dense(
    name: str,
    *,
    batch: int = 1,
    channels: int = 64,
    size: tuple[int, int] = (32, 32),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    rounds: int = 3,
    min_time: float = 0.05,
    compile: bool = False,
    compile_backend: str = "inductor",
    max_call_s: float | None = None,
    module: nn.Module | None = None,
    timer: Callable[[Callable[[], object]], float] | None = None,
    count_flops: bool = False,
    known_flops: tuple[float, float] | None = None,
    matmul_tflops: float | None = None,
) -> DenseRatio:
    """One block (registry ``name``, or ``module`` labelled ``name``) against :class:`DenseAttention`.

    ``max_call_s``: when the first forward+backward of the block or of dense takes longer, the row is
    returned with a ``skipped`` status instead of timing rounds that would take minutes. ``timer``
    (fn -> ms) replaces the torch.utils.benchmark timer, for tests.

    ``count_flops``: after timing, one more forward+backward of the (eager) block and of dense under
    :func:`forward_backward_flops` fills ``block_flops`` / ``dense_flops``, unless ``known_flops``
    (block, dense) gives them already (the same block, size and dtype in another mode). With
    ``matmul_tflops`` (this device and dtype, measured in the same run) the row also gets the fraction
    of it that the block and dense achieve. A failed count leaves NaN and says why in ``flops_note``.
    """
    device = torch.device(device)
    torch.manual_seed(0)
    block = module if module is not None else create_attn(name, channels)
    block = block.to(device=device, dtype=dtype).train()
    heads = block_heads(block, channels)
    dense = DenseAttention(channels, heads=heads).to(device=device, dtype=dtype).train()
    h, w = size
    x = torch.randn(batch, channels, h, w, device=device, dtype=dtype, requires_grad=True)
    saved_block = saved_activation_bytes(block, x) / 2**20
    saved_dense = saved_activation_bytes(dense, x) / 2**20
    run_block, run_dense = block, dense
    if compile:
        run_block = torch.compile(block, backend=compile_backend)
        run_dense = torch.compile(dense, backend=compile_backend)

    def step(model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def fwd_bwd() -> None:
            out = model(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            out.float().sum().backward()

        return fwd_bwd

    fb_block, fb_dense = step(run_block), step(run_dense)
    row = DenseRatio(
        name, batch, channels, h, w, str(dtype).replace("torch.", ""), str(device),
        "compiled" if compile else "eager", heads, rounds, math.nan, math.nan, math.nan,
        saved_block, saved_dense, saved_block / saved_dense if saved_dense else math.nan,
    )  # fmt: skip
    # First calls compile (when asked) and warm the allocator; the second one's time sets how many
    # calls fill ``min_time`` in each round (a compiling first call would say nothing about that).
    numbers = {}
    for label, fn in (("block", fb_block), ("dense", fb_dense)):
        for _ in range(2 if compile else 1):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            took = time.perf_counter() - start
        if label == "block":
            row.first_call_s = took
        if max_call_s is not None and took > max_call_s:
            row.status = f"skipped: one {label} forward+backward took {took:.1f} s > {max_call_s:g} s"
            return row
        numbers[label] = max(1, int(min_time / max(took, 1e-6)))
    if timer is None:

        def timer(fn: Callable[[], object]) -> float:
            _sync(device)
            ms = _benchmark_ms(fn, numbers["block" if fn is fb_block else "dense"])
            _sync(device)
            return ms

    row.block_ms, row.dense_ms, row.time_ratio = interleaved_ratio(
        lambda: timer(fb_block), lambda: timer(fb_dense), rounds
    )
    if count_flops or known_flops is not None:
        if known_flops is not None:
            row.block_flops, row.dense_flops = (float(f) for f in known_flops)
        else:
            try:
                # The eager modules, also for a compiled row: the work is the same, and FlopCounterMode
                # sees no aten ops inside a compiled graph.
                row.block_flops = float(forward_backward_flops(block, x))
                row.dense_flops = float(forward_backward_flops(dense, x))
            except Exception as err:  # a missing count must not cost the timing just measured
                row.flops_note = f"{type(err).__name__}: {err}"[:200]
        row.matmul_tflops = math.nan if matmul_tflops is None else float(matmul_tflops)
        _set_rates(row)
    return row


def sweep_vs_dense(
    names: Iterable[str],
    sizes: Iterable[tuple[int, int]],
    *,
    batch: int = 1,
    channels: int = 64,
    dtypes: Iterable[torch.dtype] = (torch.float32,),
    device: str = "cpu",
    rounds: int = 3,
    min_time: float = 0.05,
    compile: bool = False,
    compile_backend: str = "inductor",
    max_call_s: float | None = None,
    on_row: Callable[[DenseRatio], None] | None = None,
    progress: bool = True,
    count_flops: bool = False,
    matmul_tflops: dict[str, float] | None = None,
    flops_cache: dict[tuple, tuple[float, float]] | None = None,
) -> list[DenseRatio]:
    """:func:`measure_vs_dense` for every (dtype, size, block); a failing block becomes an error row.

    ``on_row`` is called after each row (the GPU sweep saves its results there, so a run cut short
    keeps what it measured). With ``max_call_s``, a block whose call at a smaller size, scaled as
    N^e (e: its declared FLOP exponent, at least 1), predicts more than ``max_call_s`` is skipped
    without being run: one call of an O(N²) block at a large map can take minutes on a CPU.

    ``count_flops`` (off by default: one more forward+backward of block and dense per row) fills the
    rows' FLOPs and throughput; ``matmul_tflops`` maps a dtype name ("bfloat16") to the same run's
    matmul rate. ``flops_cache``, keyed by :func:`flops_key`, carries counts between calls so a
    (block, size, dtype) is counted once, e.g. for its eager and its compiled row; counts made here
    are added to it.
    """
    names, sizes, dtypes = list(names), list(sizes), list(dtypes)
    dev = torch.device(device)
    rows: list[DenseRatio] = []
    jobs = [(dt, s, n) for dt in dtypes for s in sizes for n in names]
    bar = _progress(len(jobs), progress)
    for dt, size, name in jobs:
        bar.set_description(f"vs dense: {name} {size[0]}x{size[1]} {str(dt).replace('torch.', '')}")
        tokens = size[0] * size[1]
        known = [
            (r.height * r.width, r.first_call_s) for r in rows if r.name == name and r.dtype == str(dt)[6:]
        ]
        known = [(n, t) for n, t in known if n < tokens and not math.isnan(t)]
        try:
            growth = max(1.0, attn_info(name).flops_exponent)
        except ValueError:  # not a registry name: assume the worst declared growth
            growth = 2.0
        predicted = max((t * (tokens / n) ** growth for n, t in known), default=0.0)
        if max_call_s is not None and not compile and predicted > max_call_s:
            row = DenseRatio(
                name, batch, channels, size[0], size[1], str(dt).replace("torch.", ""), device, "eager", 0,
                rounds, *[math.nan] * 6,
                status=f"skipped: one block forward+backward predicted at {predicted:.1f} s > {max_call_s:g} s",
            )  # fmt: skip
            rows.append(row)
            if on_row is not None:
                on_row(row)
            bar.update(1)
            continue
        key = flops_key(name, batch, channels, size, dt)
        counted = flops_cache.get(key) if (count_flops and flops_cache is not None) else None
        try:
            row = measure_vs_dense(
                name, batch=batch, channels=channels, size=size, dtype=dt, device=device, rounds=rounds,
                min_time=min_time, compile=compile, compile_backend=compile_backend, max_call_s=max_call_s,
                count_flops=count_flops, known_flops=counted,
                matmul_tflops=(matmul_tflops or {}).get(str(dt).replace("torch.", "")),
            )  # fmt: skip
            if count_flops and flops_cache is not None and not math.isnan(row.block_flops):
                flops_cache[key] = (row.block_flops, row.dense_flops)
        except Exception as err:  # one failing block (or OOM) must not end a long sweep
            row = DenseRatio(
                name, batch, channels, size[0], size[1], str(dt).replace("torch.", ""), device,
                "compiled" if compile else "eager", 0, rounds, *[math.nan] * 6,
                status=f"error: {type(err).__name__}: {err}"[:200],
            )  # fmt: skip
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        if on_row is not None:
            on_row(row)
        bar.update(1)
    bar.close()
    return rows


def flops_key(name: str, batch: int, channels: int, size: tuple[int, int], dtype) -> tuple:
    """Key of a FLOP count in :func:`sweep_vs_dense`'s ``flops_cache``: (name, batch, channels, H, W, dtype)."""
    return (name, batch, channels, size[0], size[1], str(dtype).replace("torch.", ""))


def _num(v: float, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def format_vs_dense(rows: Sequence[DenseRatio]) -> str:
    """Plain-text table of the rows, then the crossover of every (block, dtype, mode)."""
    head = ("block", "dtype", "mode", "HxW", "heads", "block ms", "dense ms", "time x", "memory x", "status")
    table = [head] + [
        (
            r.name,
            r.dtype,
            r.mode,
            f"{r.height}x{r.width}",
            str(r.heads),
            _num(r.block_ms),
            _num(r.dense_ms),
            _num(r.time_ratio),
            _num(r.memory_ratio),
            r.status,
        )  # fmt: skip
        for r in rows
    ]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines = ["  ".join(v.ljust(wd) for v, wd in zip(t, widths)).rstrip() for t in table]
    squares = sorted({r.height for r in rows if r.height == r.width})
    if squares:
        lines += ["", f"crossover (smallest side from which the block beats dense), grid {squares}:"]
        for (name, dt, mode), side in sorted(crossovers(rows).items()):
            where = f"{side}x{side}" if side is not None else f"none up to {squares[-1]}x{squares[-1]}"
            lines.append(f"  {name:<20} {dt:<9} {mode:<8} {where}")
    return "\n".join(lines)


def markdown_vs_dense(
    rows: Sequence[DenseRatio],
    *,
    reasons: dict[str, str] | None = None,
    mode: str = "eager",
    dtype: str | None = None,
) -> str:
    """Markdown table: one line per block, the time ratio at each square side, the saved-memory ratio at
    the largest side, the crossover, and (for blocks at >= 1.0x dense at the largest side) the reason
    from ``reasons`` where one is known. Ratios >= 1.0 are bold."""
    rows = [r for r in rows if r.mode == mode and (dtype is None or r.dtype == dtype) and r.height == r.width]
    sides = sorted({r.height for r in rows})
    if not sides:
        return "_no rows measured._"
    top = sides[-1]
    cross = crossovers(rows)
    by = {(r.name, r.height): r for r in rows}
    names = sorted({r.name for r in rows})
    out = [
        "| block | FLOP exp. | heads | "
        + " | ".join(f"time x at {s}x{s}" for s in sides)
        + f" | saved memory x at {top}x{top} | crossover | why >= 1.0x |",
        "|---|---|---|" + "---|" * len(sides) + "---|---|---|",
    ]
    for name in names:
        try:
            exp = f"{attn_info(name).flops_exponent:g}"
        except ValueError:
            exp = "-"
        cells, heads = [], "-"
        for s in sides:
            r = by.get((name, s))
            if r is None:
                cells.append("-")
            elif r.status != "ok":
                cells.append("skipped" if r.status.startswith("skipped") else "error")
            else:
                heads = str(r.heads)
                cells.append(f"**{r.time_ratio:.2f}**" if r.time_ratio >= 1.0 else f"{r.time_ratio:.2f}")
        last = by.get((name, top))
        mem = _num(last.memory_ratio) if last is not None else "-"
        side = cross.get((name, last.dtype if last else "", mode)) if last is not None else None
        where = f"{side}" if side is not None else "none"
        losing = last is None or last.status != "ok" or not last.time_ratio < 1.0
        why = (reasons or {}).get(name, "") if losing else ""
        out.append(f"| `{name}` | {exp} | {heads} | " + " | ".join(cells) + f" | {mem} | {where} | {why} |")
    return "\n".join(out)


BEGIN = "<!-- vs-dense:begin (generated; edit the tool, not this section) -->"
END = "<!-- vs-dense:end -->"


def replace_section(text: str, body: str) -> str:
    """``text`` with the generated vs-dense section replaced by ``body`` (appended when absent)."""
    return replace_generated_section(text, body, BEGIN, END, "vs-dense")


def machine_description(device: str | torch.device = "cpu") -> str:
    """The machine in words: the GPU name, or the CPU model with its cores, torch's threads and the load."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def load_average() -> str:
    """1-minute load average with the core count (where the OS reports it)."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def write_vs_dense_json(rows: Sequence[DenseRatio], path: str | Path, meta: dict | None = None) -> None:
    """Rows and ``meta`` as JSON, written atomically."""
    write_rows_json(rows, path, meta)


def write_vs_dense_csv(rows: Sequence[DenseRatio], path: str | Path) -> None:
    """Rows as CSV (one column per :class:`DenseRatio` field), written atomically."""
    write_rows_csv(rows, DenseRatio, path)


def read_vs_dense_json(path: str | Path) -> tuple[dict, list[DenseRatio]]:
    """(meta, rows) of a file written by :func:`write_vs_dense_json`; ValueError naming the file otherwise."""
    return read_rows_json(
        path,
        DenseRatio,
        "vs-dense: {path} is not a vs-dense JSON file ({cause})",
    )
