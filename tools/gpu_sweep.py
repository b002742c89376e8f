"""The prepared GPU sweep: every block against dense multi-head SDPA, bf16 and fp32, 64/128/256 squares, eager
and torch.compile, peers where installed, and CUDA-vs-CPU agreement, in one run a short device session can afford.

    python tools/gpu_sweep.py OUT_DIR [--budget SECONDS]       # on the GPU machine; writes OUT_DIR/sweep.json
    python tools/gpu_sweep.py --docs OUT_DIR                    # the "versus dense" section of docs/benchmarks-gpu.md
    python tools/gpu_sweep.py --docs                            # that section as "not measured yet"
    python tools/gpu_sweep.py OUT_DIR --smoke                   # CPU, two blocks, tiny sizes: checks the plumbing

Work runs most informative first (bf16 eager at 128 and 256, where the issue's goals are stated; then 64 for the
crossover; fp32; compiled bf16 at 128; peers; agreement) and stops when ``--budget`` seconds are spent, so a run cut
short still answers the main question. OUT_DIR/sweep.json is rewritten atomically after every row. Each vs-dense
row times the block and dense SDPA (the block's own head count) back to back over interleaved rounds and keeps the
median ratio (:mod:`visattn.bench.vs_dense`). The device is named in the JSON and on the page.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visattn.atomic import atomic_write_text  # noqa: E402
from visattn.bench import vs_dense  # noqa: E402

PAGE = ROOT / "docs" / "benchmarks-gpu.md"


def plan(smoke: bool) -> dict:
    """Settings and the ordered stages: (kind, dtype, side) with kind 'eager', 'compiled' or 'peers'."""
    if smoke:
        return {
            "device": "cpu",
            "batch": 1,
            "channels": 16,
            "rounds": 1,
            "min_time": 0.001,
            "max_call_s": 5.0,
            "compile_backend": "eager",  # dynamo only: checks tracing without minutes of C++ compilation
            "names": ["cbam", "gcnet"],
            "stages": [
                ("eager", "float32", 16),
                ("eager", "float32", 8),
                ("eager", "bfloat16", 8),
                ("compiled", "float32", 8),
                ("peers", "float32", 8),
            ],
        }
    return {
        "device": "cuda",
        "batch": 2,
        "channels": 256,
        "rounds": 3,
        "min_time": 0.03,
        "max_call_s": 2.0,
        "compile_backend": "inductor",
        "names": None,
        "stages": [
            ("eager", "bfloat16", 128),
            ("eager", "bfloat16", 256),
            ("eager", "bfloat16", 64),
            ("eager", "float32", 128),
            ("eager", "float32", 64),
            ("compiled", "bfloat16", 128),
            ("eager", "float32", 256),
            ("peers", "float32", 64),
            ("compiled", "bfloat16", 256),
            ("agreement", "float32", 0),
        ],
    }


def agreement(name: str) -> float:
    """Max abs difference between CUDA and CPU outputs (fp32, eval, perturbed weights) at 2x32x16x20."""
    from visattn.export import _perturbed

    block = _perturbed(name, 32)
    x = torch.randn(2, 32, 16, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = block(x)
        out = block.cuda()(x.cuda()).cpu()
    return float((out - ref).abs().max())


def parse_stage(text: str) -> tuple[str, str, int]:
    """``"compiled:bfloat16:128"`` -> ("compiled", "bfloat16", 128); argparse error naming the entry."""
    kind, _, rest = text.partition(":")
    dt, _, side = rest.partition(":")
    if kind not in ("eager", "compiled", "peers", "agreement") or dt not in ("float32", "bfloat16"):
        raise argparse.ArgumentTypeError(
            f"stage must be KIND:DTYPE:SIDE with KIND eager|compiled|peers|agreement and DTYPE float32|bfloat16, "
            f"e.g. compiled:bfloat16:128; got {text!r}"
        )
    try:
        return kind, dt, int(side or 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"stage side must be an integer, got {text!r}") from None


def run(
    out_dir: Path,
    budget: float,
    smoke: bool,
    names: list[str] | None = None,
    stages: list[tuple[str, str, int]] | None = None,
) -> dict:
    """Run the stages in order until ``budget`` seconds are spent; returns the saved results."""
    import visattn
    from visattn.bench import peers
    from visattn.bench.runner import matmul_flops_per_s

    cfg = plan(smoke)
    if stages:
        cfg["stages"] = stages
    names = names or cfg["names"] or visattn.list_attns()
    dev = torch.device(cfg["device"])
    start = time.time()
    n = 256 if smoke else 4096
    results = {
        "meta": {
            "device": vs_dense.machine_description(dev),
            "smoke": smoke,
            "torch": torch.__version__,
            "batch": cfg["batch"],
            "channels": cfg["channels"],
            "rounds": cfg["rounds"],
            "max_call_s": cfg["max_call_s"],
            "compile_backend": cfg["compile_backend"],
            "started": time.strftime("%Y-%m-%d %H:%M"),
            "matmul_tflops_fp32": matmul_flops_per_s(dev, torch.float32, n) / 1e12,
            "matmul_tflops_bf16": matmul_flops_per_s(dev, torch.bfloat16, n) / 1e12,
            "stopped": None,
        },
        "vs_dense": [],
        "peers": [],
        "agreement": [],
    }
    out = out_dir / "sweep.json"
    if out.exists():
        # A later session (e.g. --stages compiled:...) adds its rows to the same file, on the same device kind.
        earlier = json.loads(out.read_text())
        if earlier["meta"]["device"] != results["meta"]["device"]:
            raise ValueError(
                f"gpu_sweep: {out} holds rows from {earlier['meta']['device']!r}, not this "
                f"{results['meta']['device']!r}: pass another OUT_DIR"
            )
        continued = earlier["meta"].setdefault("continued", [])
        continued.append(results["meta"]["started"])
        earlier["meta"]["stopped"] = None
        results = earlier

    def save() -> None:
        results["meta"]["seconds"] = round(time.time() - start, 1)
        atomic_write_text(out, json.dumps(results, indent=1, default=str))

    save()
    for kind, dt_name, side in cfg["stages"]:
        dtype = getattr(torch, dt_name)
        for name in names:
            if time.time() - start > budget:
                results["meta"]["stopped"] = f"budget of {budget:g} s reached before {kind} {dt_name} {side}"
                save()
                print(results["meta"]["stopped"], file=sys.stderr)
                return results
            if kind in ("eager", "compiled"):
                (row,) = vs_dense.sweep_vs_dense(
                    [name],
                    [(side, side)],
                    batch=cfg["batch"],
                    channels=cfg["channels"],
                    dtypes=[dtype],
                    device=cfg["device"],
                    rounds=cfg["rounds"],
                    min_time=cfg["min_time"],
                    compile=kind == "compiled",
                    compile_backend=cfg["compile_backend"],
                    max_call_s=cfg["max_call_s"],
                    progress=False,
                )
                results["vs_dense"].append(asdict(row))
                if kind == "compiled":
                    torch._dynamo.reset()  # compiled graphs of earlier blocks are not needed again
            elif kind == "peers":
                if name not in peers.PEERS:
                    continue
                for ours, peer, label in peers.compare(
                    [name],
                    batch=cfg["batch"],
                    channels=cfg["channels"],
                    size=(side, side),
                    dtype=dtype,
                    device=cfg["device"],
                    min_run_time=cfg["min_time"],
                ):
                    results["peers"].append(
                        {
                            "name": name,
                            "dtype": dt_name,
                            "side": side,
                            "ours_ms": ours.fwd_bwd_ms,
                            "ours_mib": ours.saved_mib,
                            "peer_ms": peer.fwd_bwd_ms if peer else None,
                            "peer_mib": peer.saved_mib if peer else None,
                            "label": label,
                        }
                    )
            elif kind == "agreement" and dev.type == "cuda":
                try:
                    results["agreement"].append({"name": name, "max_abs": agreement(name)})
                except Exception as err:  # a finding for the page, not a reason to stop
                    results["agreement"].append({"name": name, "error": f"{type(err).__name__}: {err}"[:200]})
            save()
    return results


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b and not math.isnan(a) and not math.isnan(b) else "-"


def docs_section(out_dir: Path | None) -> str:
    """The page's "versus dense" section from OUT_DIR/sweep.json, or "not measured yet" without one."""
    path = out_dir / "sweep.json" if out_dir is not None else None
    head = ["## Versus dense attention (GPU)", ""]
    if path is None or not path.exists():
        return "\n".join(
            head
            + [
                "**Not measured yet.** No device session has run the prepared sweep since the dense baseline was",
                "added. `python tools/gpu_sweep.py OUT_DIR` on the GPU machine measures every block against dense",
                "multi-head SDPA (bf16 and fp32, B=2, C=256, 64/128/256 squares, eager and torch.compile, peers);",
                "`python tools/gpu_sweep.py --docs OUT_DIR` then writes this section with the device named. The CPU",
                "table is in [benchmarks.md](benchmarks.md#versus-dense-attention-cpu).",
            ]
        )
    try:
        results = json.loads(path.read_text())
        meta = results["meta"]
        rows = [vs_dense.DenseRatio(**r) for r in results["vs_dense"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"gpu_sweep: {path} is not a sweep written by tools/gpu_sweep.py ({err})") from err
    lines = head + [
        f"Measured with `tools/gpu_sweep.py` on **{meta['device']}**"
        + (" (SMOKE RUN on CPU: plumbing check, not figures)" if meta.get("smoke") else "")
        + f", started {meta['started']}, {meta.get('seconds', '?')} s; dense matmul in the same run:"
        f" {meta['matmul_tflops_fp32']:.3g} TFLOP/s fp32 (TF32 off), {meta['matmul_tflops_bf16']:.3g} TFLOP/s bf16.",
        f"B={meta['batch']}, C={meta['channels']}, forward+backward in training mode. Ratio = block / dense"
        f" multi-head SDPA with the block's head count, median over {meta['rounds']} interleaved round(s); memory"
        " = saved-activation ratio. Crossover: smallest side from which the block beats dense at every larger side."
        + (f" Stopped early: {meta['stopped']}." if meta.get("stopped") else "")
        + (
            f" Continued in session(s) started {', '.join(meta['continued'])}."
            if meta.get("continued")
            else ""
        ),
    ]
    for mode in ("eager", "compiled"):
        for dt in ("bfloat16", "float32"):
            sel = [r for r in rows if r.mode == mode and r.dtype == dt]
            if sel:
                lines += ["", f"### {dt}, {mode}", "", vs_dense.markdown_vs_dense(sel, mode=mode, dtype=dt)]
    eager = {(r.name, r.dtype, r.height): r for r in rows if r.mode == "eager" and r.status == "ok"}
    compiled = [r for r in rows if r.mode == "compiled" and r.status == "ok"]
    if compiled:
        lines += [
            "",
            "### torch.compile speed-up (same size and dtype; eager ms / compiled ms)",
            "",
            "| block | dtype | H x W | block speed-up | dense speed-up |",
            "|---|---|---|---|---|",
        ]
        for r in compiled:
            e = eager.get((r.name, r.dtype, r.height))
            if e is not None:
                lines.append(
                    f"| `{r.name}` | {r.dtype} | {r.height}x{r.width} | {_ratio(e.block_ms, r.block_ms)} | "
                    f"{_ratio(e.dense_ms, r.dense_ms)} |"
                )
    if results["peers"]:
        lines += [
            "",
            "### Peers (same run; ratio = ours / peer)",
            "",
            "| block | dtype | side | time | memory | peer |",
        ]
        lines.append("|---|---|---|---|---|---|")
        for p in results["peers"]:
            lines.append(
                f"| `{p['name']}` | {p['dtype']} | {p['side']} | {_ratio(p['ours_ms'], p['peer_ms'])} | "
                f"{_ratio(p['ours_mib'], p['peer_mib'])} | {p['label']} |"
            )
    if results["agreement"]:
        lines += [
            "",
            "### CUDA vs CPU outputs (fp32, eval, 2x32x16x20)",
            "",
            "| block | max abs difference |",
        ]
        lines.append("|---|---|")
        lines += [
            f"| `{a['name']}` | {a['max_abs']:.1e} |"
            if "max_abs" in a
            else f"| `{a['name']}` | {a['error']} |"
            for a in results["agreement"]
        ]
    return "\n".join(lines)


def write_docs(out_dir: Path | None, page: Path) -> None:
    """Replace only the generated "versus dense" section of ``page`` (atomically)."""
    if not page.exists():
        raise ValueError(f"gpu_sweep: {page} does not exist; pass --page with the GPU benchmarks page")
    atomic_write_text(page, vs_dense.replace_section(page.read_text(), docs_section(out_dir)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, nargs="?")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds of measuring before stopping")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, two blocks, tiny sizes (CI plumbing check)"
    )
    parser.add_argument("--names", nargs="+", help="blocks (default: all; --smoke: cbam gcnet)")
    parser.add_argument(
        "--stages",
        type=parse_stage,
        nargs="+",
        help="run only these KIND:DTYPE:SIDE stages, in this order (e.g. a second session for compiled rows: "
        "compiled:bfloat16:128)",
    )
    parser.add_argument("--docs", action="store_true", help="write the page's vs-dense section from OUT_DIR")
    parser.add_argument("--page", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    if args.docs:
        write_docs(args.out_dir, args.page)
        print(f"wrote the versus-dense section of {args.page}")
        return 0
    if args.out_dir is None:
        parser.error("OUT_DIR is required to measure (or pass --docs)")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: this sweep is for the GPU machine (use --smoke to check it on CPU)")
    torch.backends.cuda.matmul.allow_tf32 = False
    results = run(args.out_dir, args.budget, args.smoke, args.names, args.stages)
    print(f"wrote {args.out_dir / 'sweep.json'} ({len(results['vs_dense'])} vs-dense rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
