"""The GPU sweep behind docs/benchmarks-gpu.md: every block, B=2, C=256, 64x64 and 128x128, fp32 and bf16,
plus CUDA-vs-CPU agreement of every block and the peers at 64x64 fp32.

Rows are appended to JSON-lines files as they are measured, so a run cut short still leaves its data:

    python tools/gpu_sweep.py OUT_DIR [--budget SECONDS]

then `python tools/gpu_sweep.py --markdown OUT_DIR > docs/benchmarks-gpu.md`.
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


def _jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def agreement(name: str) -> float:
    """Max abs difference between CUDA and CPU outputs (fp32, eval, perturbed weights) at 2x32x16x20."""
    from visattn.export import _perturbed

    block = _perturbed(name, 32)
    x = torch.randn(2, 32, 16, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = block(x)
        out = block.cuda()(x.cuda()).cpu()
    return float((out - ref).abs().max())


def run(out_dir: Path, budget: float) -> None:
    import visattn
    from visattn.bench import peers
    from visattn.bench.runner import bench_block, matmul_flops_per_s

    start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    meta = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "matmul_tflops_fp32": matmul_flops_per_s(dev, torch.float32, 4096) / 1e12,
        "matmul_tflops_bf16": matmul_flops_per_s(dev, torch.bfloat16, 4096) / 1e12,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta))
    names = visattn.list_attns()
    for name in names:
        try:
            _jsonl(out_dir / "agree.jsonl", {"name": name, "max_abs": agreement(name)})
        except Exception as err:
            _jsonl(out_dir / "agree.jsonl", {"name": name, "error": f"{type(err).__name__}: {err}"[:200]})
    rates = {dt: matmul_flops_per_s(dev, dt) for dt in (torch.float32, torch.bfloat16)}

    def sweep(size, dtype) -> bool:
        for name in names:
            if time.time() - start > budget:
                print("budget reached", file=sys.stderr)
                return False
            try:
                row = asdict(
                    bench_block(
                        name,
                        size=size,
                        dtype=dtype,
                        device="cuda",
                        matmul_rate=rates[dtype],
                        min_run_time=0.05,
                    )
                )
            except Exception as err:
                row = {"name": name, "height": size[0], "dtype": str(dtype), "status": f"error: {err}"[:200]}
            torch.cuda.empty_cache()
            _jsonl(out_dir / "rows.jsonl", row)
        return True

    # Most informative first, so a run cut short by the device budget still answers the main question.
    if not (sweep((64, 64), torch.bfloat16) and sweep((64, 64), torch.float32)):
        return
    for ours, peer, label in peers.compare(names, device="cuda", min_run_time=0.05):
        _jsonl(
            out_dir / "peers.jsonl",
            {
                "name": ours.name,
                "ours_ms": ours.fwd_bwd_ms,
                "ours_mib": ours.saved_mib,
                "peer_ms": peer.fwd_bwd_ms if peer else None,
                "peer_mib": peer.saved_mib if peer else None,
                "label": label,
            },
        )
    if sweep((128, 128), torch.bfloat16):
        sweep((128, 128), torch.float32)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def markdown(out_dir: Path) -> str:
    meta = json.loads((out_dir / "meta.json").read_text())
    lines = [
        "# GPU benchmarks",
        "",
        f"Measured with `tools/gpu_sweep.py` on one **{meta['gpu']}** (torch {meta['torch']}); dense matmul in the",
        f"same run: {meta['matmul_tflops_fp32']:.0f} TFLOP/s fp32 (TF32 off), {meta['matmul_tflops_bf16']:.0f} TFLOP/s bf16.",
        "Forward+backward medians (torch.utils.benchmark), B=2, C=256, training mode; saved = bytes autograd keeps for",
        "backward; peak = extra CUDA memory of one forward+backward.",
        "",
        "| block | dtype | H x W | fwd ms | fwd+bwd ms | GFLOPs (fwd) | saved MiB | peak MiB | matmul fraction |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _read(out_dir / "rows.jsonl"):
        if r.get("status", "ok") != "ok":
            lines.append(f"| `{r['name']}` | {r.get('dtype')} | {r.get('height')} | {r['status']} |||||")
            continue
        f = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"  # noqa: E731
        lines.append(
            f"| `{r['name']}` | {r['dtype']} | {r['height']}x{r['width']} | {f(r['fwd_ms'])} | "
            f"{f(r['fwd_bwd_ms'])} | {f(r['fwd_gflops'])} | {f(r['saved_mib'])} | {f(r['peak_mib'])} | "
            f"{f(r['matmul_fraction'])} |"
        )
    peers = _read(out_dir / "peers.jsonl")
    if peers:
        lines += [
            "",
            "## Peers (64x64, fp32, same run; ratio = ours / peer)",
            "",
            "| block | time ratio | saved-memory ratio | peer |",
            "|---|---|---|---|",
        ]
        for p in peers:
            if p["peer_ms"]:
                lines.append(
                    f"| `{p['name']}` | {p['ours_ms'] / p['peer_ms']:.2f} | "
                    f"{p['ours_mib'] / p['peer_mib']:.2f} | {p['label']} |"
                )
            else:
                lines.append(f"| `{p['name']}` | - | - | {p['label']} |")
    agree = _read(out_dir / "agree.jsonl")
    if agree:
        lines += [
            "",
            "## CUDA vs CPU outputs (fp32, eval, 2x32x16x20)",
            "",
            "| block | max abs difference |",
            "|---|---|",
        ]
        lines += [
            f"| `{a['name']}` | {a['max_abs']:.1e} |"
            if "max_abs" in a
            else f"| `{a['name']}` | {a['error']} |"
            for a in agree
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds of sweep before stopping")
    parser.add_argument("--markdown", action="store_true", help="print docs/benchmarks-gpu.md from OUT_DIR")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(args.out_dir), end="")
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        run(args.out_dir, args.budget)
