"""Sweeps of blocks x sizes: time, FLOPs, activation memory, peak memory, parameters.

Every row of a sweep is measured in the same process as a dense matmul reference, so achieved
FLOP/s is reported as a fraction of what this device reaches on a plain matmul right now, which
is comparable across machines (absolute times are only meaningful on a GPU; see DESIGN.md).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils import benchmark

from ..atomic import atomic_write_text
from ..registry import attn_info, create_attn
from .measure import count_flops, growth_exponent, saved_activation_bytes

__all__ = [
    "BenchRow",
    "bench_block",
    "run_sweep",
    "matmul_flops_per_s",
    "write_csv",
    "write_json",
    "fit_exponents",
]


@dataclass
class BenchRow:
    name: str
    batch: int
    channels: int
    height: int
    width: int
    dtype: str
    device: str
    params: int
    fwd_ms: float
    fwd_bwd_ms: float
    fwd_gflops: float
    saved_mib: float
    peak_mib: float | None
    matmul_fraction: float
    status: str = "ok"
    extra: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.height * self.width


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.2) -> float:
    """Median wall time of ``fn`` in milliseconds (torch.utils.benchmark, warm-up included).

    On CUDA, torch.utils.benchmark synchronises around each measurement, which is what CUDA
    events would give for a single stream.
    """
    fn()
    _sync(device)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def interleaved_times(fns: Sequence[Callable[[], float]], rounds: int) -> list[list[float]]:
    """Each of ``fns`` (a timing: it returns a duration) called once per round, in order on even rounds and
    in reverse on odd ones, so a drift in machine load inside a round does not always favour the same one.
    Returns every function's durations, one per round."""
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for r in range(rounds):
        for i in order if r % 2 == 0 else reversed(order):
            times[i].append(fns[i]())
    return times


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    """Achieved FLOP/s of an n x n x n matmul on this device and dtype, measured now."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, min_run_time=0.2)
    return 2 * n**3 / (ms * 1e-3)


def bench_block(
    name: str,
    *,
    batch: int = 2,
    channels: int = 256,
    size: tuple[int, int] = (64, 64),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    module: torch.nn.Module | None = None,
    matmul_rate: float | None = None,
    min_run_time: float = 0.2,
    label: str | None = None,
) -> BenchRow:
    """Measure one block (a registry name, or ``module`` with ``label``) at one size."""
    device = torch.device(device)
    block = module if module is not None else create_attn(name, channels)
    block = block.to(device=device, dtype=dtype).train()
    h, w = size
    x = torch.randn(batch, channels, h, w, device=device, dtype=dtype, requires_grad=True)
    params = sum(p.numel() for p in block.parameters())

    def fwd():
        with torch.no_grad():
            return block(x)

    def fwd_bwd():
        out = block(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().sum().backward()

    # Counted with grad mode on and a detached input: FlopCounterMode's module tracker fails on
    # no_grad views of tensors that require grad (some peers expand parameters that way).
    flops = count_flops(block, x.detach())
    saved = saved_activation_bytes(block, x)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fwd_bwd()
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    t_fwd = time_ms(fwd, device, min_run_time)
    t_fwd_bwd = time_ms(fwd_bwd, device, min_run_time)
    rate = matmul_rate or matmul_flops_per_s(device, dtype)
    fraction = (flops / (t_fwd * 1e-3)) / rate if t_fwd > 0 else float("nan")
    return BenchRow(
        name=label or name,
        batch=batch,
        channels=channels,
        height=h,
        width=w,
        dtype=str(dtype).replace("torch.", ""),
        device=str(device),
        params=params,
        fwd_ms=t_fwd,
        fwd_bwd_ms=t_fwd_bwd,
        fwd_gflops=flops / 1e9,
        saved_mib=saved / 2**20,
        peak_mib=peak,
        matmul_fraction=fraction,
    )


def run_sweep(
    names: Iterable[str],
    sizes: Iterable[tuple[int, int]],
    *,
    batch: int = 2,
    channels: int = 256,
    dtypes: Iterable[torch.dtype] = (torch.float32,),
    device: str = "cpu",
    min_run_time: float = 0.2,
    progress: bool = True,
) -> list[BenchRow]:
    """Measure every (block, size, dtype); a block that fails is reported with its error, not raised."""
    names, sizes, dtypes = list(names), list(sizes), list(dtypes)
    dev = torch.device(device)
    rates = {dt: matmul_flops_per_s(dev, dt) for dt in dtypes}
    jobs = [(n, s, dt) for dt in dtypes for n in names for s in sizes]
    rows: list[BenchRow] = []
    bar = _progress(len(jobs), progress)
    for name, size, dt in jobs:
        bar.set_description(f"{name} {size[0]}x{size[1]} {str(dt).replace('torch.', '')}")
        try:
            rows.append(
                bench_block(
                    name,
                    batch=batch,
                    channels=channels,
                    size=size,
                    dtype=dt,
                    device=device,
                    matmul_rate=rates[dt],
                    min_run_time=min_run_time,
                )
            )
        except Exception as err:  # one failing block must not end a long sweep
            rows.append(
                BenchRow(
                    name,
                    batch,
                    channels,
                    size[0],
                    size[1],
                    str(dt).replace("torch.", ""),
                    device,
                    0,
                    math.nan,
                    math.nan,
                    math.nan,
                    math.nan,
                    None,
                    math.nan,
                    status=f"error: {type(err).__name__}: {err}"[:200],
                )
            )
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        bar.update(1)
    bar.close()
    return rows


class _NoBar:
    def set_description(self, *_):
        pass

    def update(self, *_):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with timm's hub dependency, but stay usable without it
        return _NoBar()
    return tqdm(total=total, leave=False)


def fit_exponents(rows: list[BenchRow]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (block, dtype): fitted growth exponents in N = H*W of time, FLOPs and saved memory."""
    groups: dict[tuple[str, str], list[BenchRow]] = {}
    for r in rows:
        if r.status == "ok":
            groups.setdefault((r.name, r.dtype), []).append(r)
    out = {}
    for key, rs in groups.items():
        if len({r.tokens for r in rs}) < 2:
            continue
        n = [r.tokens for r in rs]
        fit = {}
        for metric in ("fwd_bwd_ms", "fwd_gflops", "saved_mib"):
            values = [getattr(r, metric) for r in rs]
            if min(values) > 0:
                fit[metric] = growth_exponent(n, values)
        out[key] = fit
    return out


COLUMNS = (
    "name",
    "dtype",
    "height",
    "width",
    "params",
    "fwd_ms",
    "fwd_bwd_ms",
    "fwd_gflops",
    "saved_mib",
    "peak_mib",
    "matmul_fraction",
    "status",
)


def format_table(rows: list[BenchRow]) -> str:
    def cell(r: BenchRow, c: str) -> str:
        v = getattr(r, c)
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}")
        return str(v)

    table = [COLUMNS] + [tuple(cell(r, c) for c in COLUMNS) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(wd) for v, wd in zip(row, widths)).rstrip() for row in table)


def write_csv(rows: list[BenchRow], path: str | Path) -> None:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS[:1]) + [k for k in asdict(rows[0]) if k != "name"])
    writer.writeheader()
    for r in rows:
        writer.writerow(asdict(r))
    atomic_write_text(path, buf.getvalue())


def write_json(rows: list[BenchRow], path: str | Path, meta: dict | None = None) -> None:
    payload = {
        "meta": {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__, **(meta or {})},
        "rows": [asdict(r) for r in rows],
    }
    atomic_write_text(path, json.dumps(payload, indent=1, default=str))


def declared_exponent(name: str) -> float | None:
    try:
        return attn_info(name).flops_exponent
    except ValueError:
        return None
