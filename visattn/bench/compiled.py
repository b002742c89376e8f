"""Eager against ``torch.compile(fullgraph=True)`` for one block instance, forward+backward in training mode.

The same module runs eager and compiled on the same input, so the ratio compiled / eager is what
compiling buys for that block on this device and dtype. Timing follows :mod:`visattn.bench.vs_dense`:
interleaved rounds (alternating which side goes first), the ratio is the median of per-round ratios.

The first compiled call is timed on its own (``compile_s``: tracing, lowering and code generation of
forward and backward) and doubles as the correctness check: before it and before one eager call the
seed and the block's buffers are reset, so both see the same random draws (inductor is asked for
eager's random ops, ``fallback_random``) and the same state (EMA centroids, BatchNorm statistics). The
output and the input gradient (under a fixed random cotangent) are compared with the dtype's tolerance.
Parameters that are all zero at initialisation (the residual gates and output projections that make a
block the identity) are drawn from N(0, 0.1²) first: otherwise the output would be the input and the
check would not see the attention path. The timing does the same operations either way.

With ``fullgraph=True`` a graph break is an error: the row records it (status ``graph break``) with the
break count from ``torch._dynamo.explain`` where that runs.

Run on every block and write the docs section::

    OMP_NUM_THREADS=1 python -m visattn.bench.compiled measure docs/bench-compiled-cpu.json
    python -m visattn.bench.compiled doc docs/bench-compiled-cpu.json   # docs/benchmarks.md section
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..atomic import atomic_write_text
from ..registry import create_attn
from .measure import saved_activation_bytes
from .rows_io import read_rows_json, replace_generated_section, write_rows_csv, write_rows_json
from .runner import _progress, _sync
from .vs_dense import _benchmark_ms, interleaved_ratio, load_average, machine_description

__all__ = [
    "CompiledRow",
    "TOLERANCES",
    "measure_compiled",
    "sweep_compiled",
    "format_compiled",
    "markdown_compiled",
    "compiled_section",
    "replace_compiled_section",
    "write_compiled_json",
    "write_compiled_csv",
    "read_compiled_json",
]

# Largest |compiled - eager| accepted, relative to max(1, max |eager|) of the compared tensor: compiled
# kernels reassociate sums and fuse ops, so they differ from eager by rounding, more in low precision.
TOLERANCES = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 5e-2, "float16": 1e-2}


@dataclass
class CompiledRow:
    """One block, eager against compiled, at one size and dtype (ratio < 1: compiling pays)."""

    name: str
    batch: int
    channels: int
    height: int
    width: int
    dtype: str
    device: str
    backend: str
    compile_mode: str  # torch.compile's ``mode`` ("default" when None)
    rounds: int
    eager_ms: float  # median forward+backward time over rounds
    compiled_ms: float
    ratio: float  # median over rounds of compiled / eager in the same round
    compile_s: float  # first compiled forward+backward (compilation included)
    graph_breaks: int  # 0 when fullgraph compiled; the count from dynamo's explain otherwise (-1: unknown)
    graphs: int  # graphs dynamo compiled for the block (more than 1: recompiles)
    max_out_err: float  # max |compiled - eager| of the output
    max_grad_err: float  # max |compiled - eager| of the input gradient
    tolerance: float  # the dtype's tolerance times max(1, max |eager|), the larger of output and gradient
    saved_mib: float  # eager saved activations (visattn.bench.saved_activation_bytes)
    status: str = "ok"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]


def _graph_break_count(block: nn.Module, x: torch.Tensor) -> int:
    """Graph breaks of ``block(x)`` as dynamo counts them (tracing only, no code generation); -1 when the
    count itself fails."""
    try:
        torch._dynamo.reset()
        return int(torch._dynamo.explain(block)(x).graph_break_count)
    except Exception:  # the count is a diagnostic: the row's status already says what failed
        return -1


def measure_compiled(
    name: str,
    *,
    batch: int = 1,
    channels: int = 64,
    size: tuple[int, int] = (64, 64),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    rounds: int = 3,
    backend: str = "inductor",
    mode: str | None = None,
    min_time: float = 0.05,
    module: nn.Module | None = None,
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> CompiledRow:
    """Eager against ``torch.compile(block, fullgraph=True, backend=backend, mode=mode)`` for one block.

    ``name`` is a registry name (or the label of ``module`` when given). ``timer`` (fn -> ms) replaces
    the torch.utils.benchmark timer, for tests. A graph break or a compile error returns a row with a
    ``graph break`` or ``error`` status instead of raising; a compiled result outside the dtype's
    tolerance is timed and marked ``mismatch``.
    """
    if rounds < 1:
        raise ValueError(f"bench --compiled: rounds must be >= 1, got {rounds}")
    device = torch.device(device)
    torch.manual_seed(0)
    block = module if module is not None else create_attn(name, channels)
    block = block.to(device=device, dtype=dtype).train()
    with torch.no_grad():
        for p in block.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.normal_(0.0, 0.1)
    h, w = size
    x = torch.randn(batch, channels, h, w, device=device, dtype=dtype, requires_grad=True)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    row = CompiledRow(
        name, batch, channels, h, w, _dtype_name(dtype), str(device), backend, mode or "default", rounds,
        *[math.nan] * 4, 0, 0, *[math.nan] * 3,
        saved_activation_bytes(block, x) / 2**20,
    )  # fmt: skip
    block.load_state_dict(state)

    def checked_call(model: Callable[[torch.Tensor], object], cotangent: torch.Tensor | None):
        """Output and input gradient of one forward+backward from the saved seed and state."""
        torch.manual_seed(1)
        x.grad = None
        out = _first(model(x))
        if cotangent is None:
            gen = torch.Generator(device=out.device).manual_seed(2)
            cotangent = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
        out.backward(cotangent)
        _sync(device)
        result = out.detach().clone(), x.grad.detach().clone(), cotangent
        block.load_state_dict(state)
        block.zero_grad(set_to_none=True)
        return result

    # Inductor's own random kernels differ from eager's; the check needs the same draws on both sides.
    patch = contextlib.nullcontext()
    if backend == "inductor":
        import torch._inductor.config as inductor_config

        patch = inductor_config.patch(fallback_random=True)
    torch._dynamo.reset()
    graphs_before = _unique_graphs()
    compiled = torch.compile(block, fullgraph=True, backend=backend, mode=mode)
    with patch:
        ref_out, ref_grad, cotangent = checked_call(block, None)
        start = time.perf_counter()
        try:
            out, grad, _ = checked_call(compiled, cotangent)
        except Exception as err:
            from torch._dynamo.exc import Unsupported, UserError

            if isinstance(err, (Unsupported, UserError)):
                row.graph_breaks = _graph_break_count(block, x)
                row.status = f"graph break: {type(err).__name__}: {err}".replace("\n", " ")[:300]
            else:
                row.graph_breaks = -1
                row.status = f"error: {type(err).__name__}: {err}".replace("\n", " ")[:300]
            torch._dynamo.reset()
            return row
        row.compile_s = time.perf_counter() - start
        row.max_out_err = (out.float() - ref_out.float()).abs().max().item()
        row.max_grad_err = (grad.float() - ref_grad.float()).abs().max().item()
        rel = TOLERANCES.get(row.dtype, 1e-4)
        tol_out = rel * max(1.0, ref_out.float().abs().max().item())
        tol_grad = rel * max(1.0, ref_grad.float().abs().max().item())
        row.tolerance = max(tol_out, tol_grad)
        if not (row.max_out_err <= tol_out and row.max_grad_err <= tol_grad):
            row.status = (
                f"mismatch: max error output {row.max_out_err:.3g} (tolerance {tol_out:.3g}), "
                f"input gradient {row.max_grad_err:.3g} (tolerance {tol_grad:.3g})"
            )

        def step(model: Callable[[torch.Tensor], object]) -> Callable[[], None]:
            def fwd_bwd() -> None:
                _first(model(x)).float().sum().backward()

            return fwd_bwd

        fb_eager, fb_compiled = step(block), step(compiled)
        # The second call of each is warm: its time sets how many calls fill ``min_time`` per round.
        numbers = {}
        for fn in (fb_eager, fb_compiled):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            numbers[fn] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
        if timer is None:

            def timer(fn: Callable[[], object]) -> float:
                _sync(device)
                ms = _benchmark_ms(fn, numbers[fn])
                _sync(device)
                return ms

        row.compiled_ms, row.eager_ms, row.ratio = interleaved_ratio(
            lambda: timer(fb_compiled), lambda: timer(fb_eager), rounds
        )
    row.graphs = _unique_graphs() - graphs_before
    torch._dynamo.reset()  # the block's graphs are not needed again; keep a long sweep's memory flat
    return row


def _error_row(name, batch, channels, size, dtype, device, backend, mode, rounds, err) -> CompiledRow:
    return CompiledRow(
        name, batch, channels, size[0], size[1], _dtype_name(dtype), str(device), backend, mode or "default",
        rounds, *[math.nan] * 4, -1, 0, *[math.nan] * 4,
        status=f"error: {type(err).__name__}: {err}".replace("\n", " ")[:300],
    )  # fmt: skip


def sweep_compiled(
    names: Iterable[str],
    sizes: Iterable[tuple[int, int]] = ((64, 64),),
    *,
    batch: int = 1,
    channels: int = 64,
    dtypes: Iterable[torch.dtype] = (torch.float32,),
    device: str = "cpu",
    rounds: int = 3,
    backend: str = "inductor",
    mode: str | None = None,
    min_time: float = 0.05,
    on_row: Callable[[CompiledRow], None] | None = None,
    progress: bool = True,
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> list[CompiledRow]:
    """:func:`measure_compiled` for every (dtype, size, block). A block that fails in any way becomes a
    row with the reason in its status; the sweep goes on. ``on_row`` is called after each row (a long
    run saves there, so a run cut short keeps what it measured)."""
    names, sizes, dtypes = list(names), list(sizes), list(dtypes)
    rows: list[CompiledRow] = []
    jobs = [(dt, s, n) for dt in dtypes for s in sizes for n in names]
    bar = _progress(len(jobs), progress)
    for dt, size, name in jobs:
        bar.set_description(f"compiled: {name} {size[0]}x{size[1]} {_dtype_name(dt)}")
        try:
            row = measure_compiled(
                name, batch=batch, channels=channels, size=size, dtype=dt, device=device, rounds=rounds,
                backend=backend, mode=mode, min_time=min_time, timer=timer,
            )  # fmt: skip
        except Exception as err:  # one failing block (construction, eager forward, OOM) must not end a sweep
            row = _error_row(name, batch, channels, size, dt, device, backend, mode, rounds, err)
            torch._dynamo.reset()
        finally:
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        if on_row is not None:
            on_row(row)
        bar.update(1)
    bar.close()
    return rows


def _num(v: float, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def _short_status(status: str) -> str:
    return status.split(":", 1)[0]


def format_compiled(rows: Sequence[CompiledRow]) -> str:
    """Plain-text table of the rows (ratio = compiled / eager, < 1: compiling pays)."""
    head = ("block", "dtype", "HxW", "eager ms", "compiled ms", "ratio", "compile s", "max err", "status")
    table = [head] + [
        (
            r.name,
            r.dtype,
            f"{r.height}x{r.width}",
            _num(r.eager_ms),
            _num(r.compiled_ms),
            _num(r.ratio),
            _num(r.compile_s),
            _num(max(r.max_out_err, r.max_grad_err), 2),
            r.status,
        )  # fmt: skip
        for r in rows
    ]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(wd) for v, wd in zip(t, widths)).rstrip() for t in table)


# Why a block does not compile fullgraph in training mode (or fails the check), where the cause is known
# from its code; shown in the docs table instead of the compiler's long message.
REASONS: dict[str, str] = {
    "permutohedral": "a `torch.Generator` created in forward and a data-dependent lattice size; no fullgraph "
    "in eval either (docs/support.md)",
}


def _status_cell(row: CompiledRow, reasons: dict[str, str]) -> str:
    """The row's status for a table: the known reason of a failure, else the compiler's message cut short."""
    if row.status == "ok":
        return f"ok ({row.graphs} graphs: recompiled)" if row.graphs > 1 else "ok"
    kind = _short_status(row.status)
    if row.name in reasons and kind == "graph break":
        return f"{kind}: {reasons[row.name]}"
    text = row.status.replace("|", "/")
    return text if len(text) <= 160 else text[:157].rsplit(" ", 1)[0] + " ..."


def markdown_compiled(rows: Sequence[CompiledRow], *, reasons: dict[str, str] | None = None) -> str:
    """Markdown table, one line per row: eager ms, compiled ms, ratio (bold when compiling does not pay),
    compile seconds, max error (output or input gradient), status (for a failure, its reason from
    ``reasons``, default :data:`REASONS`, else the compiler's message cut short)."""
    reasons = REASONS if reasons is None else reasons
    if not rows:
        return "_no rows measured._"
    out = [
        "| block | eager ms | compiled ms | compiled / eager | compile s | max error | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r.name, r.dtype, r.height, r.width)):
        ratio = "-" if math.isnan(r.ratio) else f"**{r.ratio:.2f}**" if r.ratio >= 1.0 else f"{r.ratio:.2f}"
        err = max(r.max_out_err, r.max_grad_err)
        status = _status_cell(r, reasons)
        out.append(
            f"| `{r.name}` | {_num(r.eager_ms)} | {_num(r.compiled_ms)} | {ratio} | {_num(r.compile_s, 2)} | "
            f"{_num(err, 2)} | {status} |"
        )
    return "\n".join(out)


def summary(rows: Sequence[CompiledRow]) -> str:
    """One paragraph: how many blocks are faster compiled, the median ratio, and what failed."""
    ok = [r for r in rows if not math.isnan(r.ratio)]
    faster = [r for r in ok if r.ratio < 1.0]
    failed = [r for r in rows if r.status != "ok"]
    text = f"{len(faster)} of {len(ok)} timed blocks are faster compiled"
    if ok:
        text += f"; median compiled / eager {statistics.median(r.ratio for r in ok):.2f}"
        best = min(ok, key=lambda r: r.ratio)
        worst = max(ok, key=lambda r: r.ratio)
        text += f" (best `{best.name}` {best.ratio:.2f}, worst `{worst.name}` {worst.ratio:.2f})"
    if failed:
        text += "; not ok: " + ", ".join(f"`{r.name}` ({_short_status(r.status)})" for r in failed)
    return text + "."


BEGIN = "<!-- compiled-cpu:begin (generated by visattn.bench.compiled; edit the code, not this section) -->"
END = "<!-- compiled-cpu:end -->"


def replace_compiled_section(text: str, body: str) -> str:
    """``text`` with the generated eager-vs-compiled section replaced by ``body`` (appended when absent)."""
    return replace_generated_section(text, body, BEGIN, END, "bench --compiled")


def compiled_section(
    meta: dict, rows: Sequence[CompiledRow], *, missing: Sequence[str] = (), notes: Sequence[str] = ()
) -> str:
    """The "Eager vs compiled (CPU)" section of docs/benchmarks.md from a measured run."""
    first = rows[0] if rows else None
    setting = (
        f"B={first.batch}, C={first.channels}, {first.height}x{first.width}, {first.dtype}, "
        f"backend `{first.backend}`, mode {first.compile_mode}"
        if first
        else "no rows"
    )
    intro = (
        "Each block eager against the same instance under `torch.compile(block, fullgraph=True)`, "
        f"forward+backward in training mode, {setting}, one process. "
        f"Machine: {meta.get('machine', '?')}; load average {meta.get('load_before', '?')} before and "
        f"{meta.get('load_after', '?')} after ({meta.get('minutes', '?')} min, "
        f"started {meta.get('started', '?')}). "
        "On a shared machine the ms columns are indicative only; the ratio is the median over "
        f"{meta.get('rounds', '?')} round(s) of compiled / eager timed back to back (alternating which goes "
        "first). Bold: compiling does not pay. Compile s: the first compiled forward+backward (tracing, "
        "AOTAutograd and inductor's C++ code generation). Max error: the larger of max |compiled - eager| of "
        "the output and of the input gradient (a fixed random cotangent), both from the same seed and state, "
        "with zero-initialised gates drawn at random first so that the attention path is compared; the "
        "tolerance is 1e-4 x max(1, max |eager|) in fp32 (`mismatch` beyond it). A graph break fails "
        "`fullgraph=True` and is listed with its reason. Rerun: `python -m visattn.bench.compiled measure "
        "docs/bench-compiled-cpu.json`, then `python -m visattn.bench.compiled doc "
        "docs/bench-compiled-cpu.json`; "
        "`visattn bench --compiled NAMES` for a few blocks."
    )
    body = [
        "## Eager vs compiled (CPU)",
        "",
        intro,
        "",
        "The GPU's eager vs compiled figures come from the compiled stages of `tools/gpu_sweep.py` and are "
        "unmeasured: no device was lent for this run.",
        "",
        markdown_compiled(rows),
        "",
        summary(rows),
    ]
    if missing:
        body.append(f"Not measured (the run ended first): {', '.join(f'`{n}`' for n in missing)}.")
    for later in meta.get("remeasured", []):
        body.append(
            f"Re-measured after a change to the block, in a later run ({later['started']}, load average "
            f"{later.get('load_before', '?')} before and {later.get('load_after', '?')} after; rows merged by "
            f"`python -m visattn.bench.compiled merge`): {', '.join(f'`{n}`' for n in later['names'])}."
        )
    body += [f"\n{note}" for note in notes]
    return "\n".join(body)


def write_compiled_json(rows: Sequence[CompiledRow], path: str | Path, meta: dict | None = None) -> None:
    """Rows and ``meta`` as JSON, written atomically."""
    write_rows_json(rows, path, meta)


def write_compiled_csv(rows: Sequence[CompiledRow], path: str | Path) -> None:
    """Rows as CSV (one column per :class:`CompiledRow` field), written atomically."""
    write_rows_csv(rows, CompiledRow, path)


def read_compiled_json(path: str | Path) -> tuple[dict, list[CompiledRow]]:
    """(meta, rows) of a file written by :func:`write_compiled_json`; ValueError naming the file otherwise."""
    return read_rows_json(
        path,
        CompiledRow,
        "bench --compiled: {path} is not an eager-vs-compiled JSON file ({cause}); "
        "write one with `python -m visattn.bench.compiled measure PATH`",
    )


def _measure_main(argv: list[str]) -> None:
    from ..registry import list_attns

    parser = argparse.ArgumentParser(prog="python -m visattn.bench.compiled measure")
    parser.add_argument("out", type=Path)
    parser.add_argument("--names", nargs="*", help="blocks (default: all)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--warm-caches",
        action="store_true",
        help="let inductor reuse its on-disk caches (compile s then understates)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.warm_caches:
        import torch._inductor.config as inductor_config

        # A graph compiled by an earlier run would come from disk and report a compile time of ~0.5 s.
        inductor_config.force_disable_caches = True
    names = args.names or list_attns()
    start = time.time()
    meta = {
        "machine": machine_description("cpu"),
        "load_before": load_average(),
        "names": names,
        "rounds": args.rounds,
        "inductor_caches": "warm" if args.warm_caches else "disabled",
        "started": time.strftime("%Y-%m-%d %H:%M"),
    }
    rows: list[CompiledRow] = []

    def save(row: CompiledRow) -> None:
        rows.append(row)
        meta.update(load_after=load_average(), minutes=round((time.time() - start) / 60, 1))
        write_compiled_json(rows, args.out, meta=meta)
        print(format_compiled([row]).splitlines()[-1], flush=True)

    sweep_compiled(
        names, [(args.size, args.size)], rounds=args.rounds, backend=args.backend, on_row=save, progress=False
    )


def _doc_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m visattn.bench.compiled doc")
    parser.add_argument("json", type=Path)
    parser.add_argument("--page", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="a paragraph after the table (repeatable); kept in the JSON, so a later doc run repeats it",
    )
    args = parser.parse_args(argv)
    meta, rows = read_compiled_json(args.json)
    if args.note:  # the notes belong to the measurement: saved with it, not only on the page
        meta = {**meta, "notes": args.note}
        write_compiled_json(rows, args.json, meta)  # meta keeps the measured torch version
    notes = meta.get("notes", [])
    done = {r.name for r in rows}
    missing = [n for n in meta.get("names", []) if n not in done]
    page = args.page.read_text()
    atomic_write_text(
        args.page,
        replace_compiled_section(page, compiled_section(meta, rows, missing=missing, notes=notes)),
    )
    print(f"wrote {args.page}")


def merge_compiled(base: str | Path, new: str | Path) -> None:
    """Replace ``base``'s rows by ``new``'s rows of the same blocks (a later run after a change to them),
    recording which blocks were re-measured, when and under what load; ``base`` is rewritten atomically,
    only after both files have been read and checked."""
    meta, rows = read_compiled_json(base)
    new_meta, new_rows = read_compiled_json(new)
    if not new_rows:
        raise ValueError(f"{new}: no rows to merge")
    settings = {(r.batch, r.channels, r.height, r.width, r.dtype, r.backend) for r in [*rows, *new_rows]}
    if len(settings) > 1:
        raise ValueError(f"merge: {base} and {new} were measured at different settings {sorted(settings)}")
    by_name = {r.name: r for r in new_rows}
    merged = [by_name.pop(r.name, r) for r in rows] + list(by_name.values())
    later = {k: new_meta.get(k) for k in ("started", "load_before", "load_after")}
    later["names"] = sorted(r.name for r in new_rows)
    meta = {**meta, "remeasured": [*meta.get("remeasured", []), later]}
    write_compiled_json(merged, base, meta=meta)


def _merge_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m visattn.bench.compiled merge")
    parser.add_argument("base", type=Path, help="the docs' JSON (rewritten)")
    parser.add_argument("new", type=Path, help="a later `measure --names ...` run")
    args = parser.parse_args(argv)
    merge_compiled(args.base, args.new)
    print(f"merged {args.new} into {args.base}")


if __name__ == "__main__":
    import sys

    commands = {"measure": _measure_main, "doc": _doc_main, "merge": _merge_main}
    if sys.argv[1:2] and sys.argv[1] in commands:
        commands[sys.argv[1]](sys.argv[2:])
    else:
        raise SystemExit(
            "usage: python -m visattn.bench.compiled {measure OUT.json | doc IN.json | merge BASE.json NEW.json}"
            " [options]"
        )
