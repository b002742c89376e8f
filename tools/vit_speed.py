"""ViT-S/16 with every ViT mixer against timm's dense attention: forward + backward time and activation memory.

    python tools/vit_speed.py                                   # 224, 512, 1024 px; docs/vit-speed.md
    python tools/vit_speed.py --sizes 224 512 1024:1 --repeats 3 --mixers performer nystrom

Each size builds timm's ``vit_small_patch16_224`` (``dynamic_img_size=True``, random weights, batch 1) once per
mixer, then times one forward + backward of every model in turn, round after round (interleaved), so that a
change of machine load hits all mixers alike; the time ratio is the median over rounds of (mixer / dense in
the same round). Activation memory is the bytes autograd keeps for backward
(:func:`visattn.bench.saved_activation_bytes`, deterministic). ``SIZE:DEPTH`` measures that size on a ViT
of DEPTH blocks (ViT-S has 12) when the whole model would take too long; the page says so. The page is
written atomically, with the machine, the thread count and the load average before and after the run.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import visattn  # noqa: E402
from visattn.atomic import atomic_write_text  # noqa: E402
from visattn.bench import saved_activation_bytes  # noqa: E402
from visattn.bench.vs_dense import machine_description  # noqa: E402

BACKBONE = "vit_small_patch16_224"
DENSE = "dense"


def _size(text: str) -> tuple[int, int | None]:
    size, _, depth = text.partition(":")
    try:
        pair = (int(size), int(depth) if depth else None)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected SIZE or SIZE:DEPTH (e.g. 512 or 1024:1), got {text!r}"
        ) from None
    if pair[0] < 16 or (pair[1] is not None and not 1 <= pair[1] <= 12):
        raise argparse.ArgumentTypeError(f"size must be >= 16 and depth in 1..12, got {text!r}")
    return pair


def _command(argv: list[str]) -> str:
    """The command line as run, each --note text shown as '...' (the notes are on the page anyway)."""
    shown = ["python", "tools/vit_speed.py"]
    for i, arg in enumerate(argv):
        shown.append("'...'" if i and argv[i - 1] == "--note" else shlex.quote(arg))
    return " ".join(shown)


def build(mixer: str, depth: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    attn = None if mixer == DENSE else mixer
    model = visattn.create_model(BACKBONE, attn, dynamic_img_size=True, depth=depth)
    return model.to(device).train()


def step(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward + backward."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    model.zero_grad(set_to_none=True)
    sync()
    start = time.perf_counter()
    model(x).float().sum().backward()
    sync()
    return time.perf_counter() - start


def measure(mixers, size, depth, repeats, warmup, device, log):
    """{mixer: (median ms, median ratio to dense, activation bytes) or an error string}.

    Every round builds each model afresh (same seed, so the same weights), warms it up and times one step,
    then frees it: holding 37 ViT-S models with their gradients grew this process past 20 GiB at 512 px (the
    allocator keeps each model's freed activations), and the OOM killer ended the run. Odd rounds go through
    the mixers in reverse, so a drift of the machine's load does not always favour the same ones.
    """
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    results = {mixer: {"bytes": None, "times": []} for mixer in mixers}
    for r in range(repeats):
        order = mixers if r % 2 == 0 else mixers[::-1]
        for mixer in order:
            res = results[mixer]
            if isinstance(res, str):
                continue
            try:
                model = build(mixer, depth, device)
                if res["bytes"] is None:
                    res["bytes"] = saved_activation_bytes(model, x)
                for _ in range(max(warmup, 1)):  # a fresh model's first step pays one-off costs
                    step(model, x)
                res["times"].append(step(model, x))
            except Exception as err:  # a mixer that fails is reported in its cell, not the end of the run
                results[mixer] = f"error: {type(err).__name__}: {str(err)[:120]}"
                log(f"  {size}px {mixer}: {results[mixer]}")
            finally:
                model = None
                gc.collect()
        log(f"  {size}px round {r + 1}/{repeats} done")
    dense = results.get(DENSE)
    out = {}
    for mixer, res in results.items():
        if isinstance(res, str):
            out[mixer] = res
            continue
        ratio = None
        if isinstance(dense, dict):
            ratio = statistics.median(t / d for t, d in zip(res["times"], dense["times"]))
        out[mixer] = (1000 * statistics.median(res["times"]), ratio, res["bytes"])
    return out


def render(table, sizes, mixers, args, device, started, load_before, load_after, elapsed) -> str:
    cols = []
    for size, depth in sizes:
        cols.append(
            f"{size} px ({(size // 16) ** 2} tokens)" + ("" if depth == 12 else f", {depth} block(s)")
        )
    lines = [
        "# ViT-S/16 with efficient attention: speed and activation memory",
        "",
        f"Generated by `{_command(sys.argv[1:])}` on {started} (UTC).",
        "",
        f"* Machine: {machine_description(device)}.",
        f"* Load average (1 min) before / after: {load_before:.1f} / {load_after:.1f}; the run took "
        f"{elapsed / 60:.1f} min.",
        "* Model: timm's `vit_small_patch16_224` (embed 384, 6 heads, `dynamic_img_size=True`, random "
        "weights), every attention layer replaced by the mixer at its ViT defaults (`visattn.create_model`); "
        "`dense` is timm's own attention (SDPA).",
        f"* Time: one forward + backward of batch 1, {args.repeats} interleaved rounds; in each round every "
        f"model is built afresh (same seed), warmed up with {max(args.warmup, 1)} step(s) and timed once; "
        "median ms, and in brackets the median over rounds of the time ratio to `dense` in the same round "
        "(below 1: faster than dense).",
        "* Memory: MiB autograd saves for backward (`visattn.bench.saved_activation_bytes`; parameters "
        "excluded; deterministic).",
    ]
    reduced = [f"{s} px: {d} of 12 blocks" for s, d in sizes if d != 12]
    if reduced:
        lines.append(
            "* Reduced depth (" + "; ".join(reduced) + "): the whole 12-block model at that size would take "
            "too long on this machine. Every block is the same, so the time ratio of one block is the "
            "model's up to the patch embedding and classifier (a few per cent of it), and the memory of the "
            "whole model is about 12 / depth times the figure shown."
        )
    lines += [f"* {note}" for note in args.note]
    if device.type == "cpu":
        lines.append(
            "* CPU timings on a shared machine: read the ratios, not the milliseconds; `nonlocal` runs "
            "exactly the dense computation through the visattn mixer, so its distance from 1.00 shows the "
            "noise (and the mixer's own overhead)."
        )
    lines += ["", "| mixer | " + " | ".join(f"{c}: ms (x dense) | MiB" for c in cols) + " |"]
    lines.append("|---|" + "---|---|" * len(cols))
    for mixer in mixers:
        cells = []
        for size, _ in sizes:
            res = table[size].get(mixer)
            if res is None:
                cells += ["-", "-"]
            elif isinstance(res, str):
                cells += [res.replace("|", "/"), "-"]
            else:
                ms, ratio, nbytes = res
                ratio_text = f" ({ratio:.2f})" if ratio is not None else ""
                cells += [f"{ms:.0f}{ratio_text}", f"{nbytes / 2**20:.0f}"]
        lines.append(f"| {mixer} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=_size, default=[(224, None), (512, None), (1024, None)])
    parser.add_argument("--depth", type=int, default=12, help="blocks of the ViT (ViT-S: 12)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mixers", nargs="+", default=None, help="default: every ViT mixer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "vit-speed.md")
    parser.add_argument(
        "--note", action="append", default=[], help="a line for the page (e.g. why a size was left out)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or not 1 <= args.depth <= 12:
        parser.error("--repeats must be >= 1, --warmup >= 0 and --depth in 1..12")
    available = visattn.list_attns(vit=True)
    unknown = sorted(set(args.mixers or ()) - set(available))
    if unknown:
        parser.error(f"not ViT mixers: {unknown}; choose from {available}")
    mixers = [DENSE, *(args.mixers or available)]
    sizes = [(s, d or args.depth) for s, d in args.sizes]
    device = torch.device(args.device)
    if not os.access(args.out.parent if args.out.parent.exists() else ROOT, os.W_OK):
        parser.error(f"--out {args.out}: folder not writable")

    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    table = {}
    for size, depth in sizes:
        print(f"{size}px, depth {depth}: {len(mixers)} models", flush=True)
        table[size] = measure(mixers, size, depth, args.repeats, args.warmup, device, print)
    text = render(table, sizes, mixers, args, device, started, load_before, os.getloadavg()[0],
                  time.perf_counter() - t0)  # fmt: skip
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
