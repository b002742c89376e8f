"""Write docs/benchmarks.md from a `visattn bench --json` sweep and (optionally) a peer-ratio JSON.

visattn bench --sizes 16,32,64 --batch 1 --channels 64 --json cpu.json --plot docs/img
python tools/benchmarks_doc.py cpu.json [--peers peers.json] > docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json

from visattn.bench.runner import BenchRow, declared_exponent, fit_exponents


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep")
    parser.add_argument("--peers")
    args = parser.parse_args()
    data = json.load(open(args.sweep))
    rows = [BenchRow(**r) for r in data["rows"]]
    fits = fit_exponents(rows)
    sizes = sorted({r.height for r in rows})
    out = [
        "# Benchmarks",
        "",
        f"Scaling of every block on CPU (torch {data['meta']['torch']}, 1 thread, B=1, C=64, square maps "
        f"{', '.join(f'{s}x{s}' for s in sizes)}), measured by `visattn bench` and fitted in N = H*W. FLOPs",
        "(`torch.utils.flop_counter`, with SDPA's CPU kernel counted) and saved-activation bytes (saved-tensor hooks)",
        "are deterministic; times come from a shared 2-core machine and are indicative only. GPU times on an H200:",
        "[benchmarks-gpu.md](benchmarks-gpu.md). Regenerate with the commands in `tools/benchmarks_doc.py`.",
        "",
        "![time](img/scaling_fwd_bwd_ms.png)",
        "",
        "![memory](img/scaling_saved_mib.png)",
        "",
        "| block | FLOP exponent (fit) | declared | saved-memory exponent | time exponent | saved MiB at "
        f"{sizes[-1]}x{sizes[-1]} |",
        "|---|---|---|---|---|---|",
    ]
    last = {r.name: r for r in rows if r.height == sizes[-1] and r.status == "ok"}
    for (name, _), fit in sorted(fits.items()):
        f = lambda k, fit=fit: f"{fit[k]:.2f}" if k in fit else "-"  # noqa: E731
        mib = f"{last[name].saved_mib:.2f}" if name in last else "-"
        out.append(
            f"| `{name}` | {f('fwd_gflops')} | {declared_exponent(name)} | {f('saved_mib')} | "
            f"{f('fwd_bwd_ms')} | {mib} |"
        )
    out += [
        "",
        "Fits are over small maps, where fixed costs (projections, landmarks, memories) still weigh; the",
        "contract suite checks every block's FLOP growth against its declared exponent at 16x16 -> 32x32.",
    ]
    if args.peers:
        peers = json.load(open(args.peers))
        out += [
            "",
            "## Peers (CPU, 1 thread, B=2, C=256, 64x64, float32, same run; ratio = ours / peer)",
            "",
            "| block | fwd+bwd time ratio | saved-memory ratio | peer (settings) |",
            "|---|---|---|---|",
        ]
        for p in peers:
            if p["peer_ms"]:
                out.append(
                    f"| `{p['name']}` | {p['ours_ms'] / p['peer_ms']:.2f} | {p['ours_mib'] / p['peer_mib']:.2f} | "
                    f"{p['label']} |"
                )
            else:
                out.append(f"| `{p['name']}` | - | - | {p['label']} |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
