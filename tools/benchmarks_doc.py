"""Write docs/benchmarks.md from a `visattn bench --json` sweep and (optionally) a peer-ratio JSON.

visattn bench --sizes 16,32,64 --batch 1 --channels 64 --json cpu.json --plot docs/img
python tools/benchmarks_doc.py cpu.json [--peers peers.json] > docs/benchmarks.md

The "versus dense" section (every block over dense multi-head SDPA, CPU, B=1, C=64, fp32) is measured and
written separately, replacing only that section of the page (atomically):

python tools/benchmarks_doc.py vs-dense-measure docs/bench-vs-dense-cpu.json   # ~15 min on 2 shared cores
python tools/benchmarks_doc.py vs-dense-doc docs/bench-vs-dense-cpu.json       # docs/benchmarks.md + plot
python tools/benchmarks_doc.py vs-dense-measure new.json --names bpt isa --max-call-s 10   # a few blocks again
python tools/benchmarks_doc.py vs-dense-merge docs/bench-vs-dense-cpu.json new.json     # ... into the table
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visattn.bench.runner import BenchRow, declared_exponent, fit_exponents  # noqa: E402

# Why a block is at >= 1.0x dense at the largest side measured, where the cause is plain from the method
# (shown in the table's last column). Filled from the measured table; a block without an entry shows none.
REASONS: dict[str, str] = {
    "danet": "declared O(N²): position attention over all pixel pairs plus a channel attention, i.e. dense's work and more",
    "inputless": "declared O(N²): learned N x N maps for 8 heads, held and multiplied explicitly (no fused kernel)",
    "synthesizer": "declared O(N²): synthesised N x N logits per head are materialised (no q·k, so no fused SDPA)",
    "etc": "declared O(N²) in its g² global term (g = N/P² global tokens attend each other), plus pattern gathers",
    "reformer": "fixed cost per token: hash, argsort and gather per hash round, then attention over 2 chunks per "
    "round; O(N log N) with a large constant (below 1.0x from 96x96 since the de-duplication rewrite)",
    "scram": "PatchMatch's propagation and random-search steps: sort, top-k and scoring of 48 new proposals per "
    "query per iteration, a per-token constant (below 1.0x from 96x96 since scores are carried, not re-scored)",
    "pkm": "top-k over product keys and EmbeddingBag gathers: a large per-token constant at small N",
}


def vs_dense_measure(argv: list[str]) -> None:
    """Measure every block against dense SDPA on this CPU, saving the JSON after every row."""
    import torch

    import visattn
    from visattn.bench import vs_dense

    parser = argparse.ArgumentParser(prog="benchmarks_doc.py vs-dense-measure")
    parser.add_argument("out", type=Path)
    # Ascending: a block's call at a smaller size predicts (and skips) a call that would take minutes.
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds of calls per timing")
    parser.add_argument("--max-call-s", type=float, default=3.0, help="skip a row whose one call is slower")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--names", nargs="*", help="blocks (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.names or visattn.list_attns()
    start = time.time()
    meta = {
        "machine": vs_dense.machine_description("cpu"),
        "load_before": vs_dense.load_average(),
        "batch": 1,
        "channels": 64,
        "dtype": "float32",
        "rounds": args.rounds,
        "max_call_s": args.max_call_s,
        "started": time.strftime("%Y-%m-%d %H:%M"),
    }
    rows = []

    def save(row) -> None:
        rows.append(row)
        meta.update(load_after=vs_dense.load_average(), minutes=round((time.time() - start) / 60, 1))
        vs_dense.write_vs_dense_json(rows, args.out, meta=meta)

    vs_dense.sweep_vs_dense(
        names,
        [(s, s) for s in args.sizes],
        batch=1,
        channels=64,
        rounds=args.rounds,
        min_time=args.min_time,
        max_call_s=args.max_call_s,
        on_row=save,
        progress=False,
    )


def vs_dense_doc(argv: list[str]) -> None:
    """Replace the "versus dense" section of the page (and write the plot) from a measured JSON."""
    from visattn.atomic import atomic_write_text
    from visattn.bench import vs_dense
    from visattn.bench.plots import plot_vs_dense

    parser = argparse.ArgumentParser(prog="benchmarks_doc.py vs-dense-doc")
    parser.add_argument("json", type=Path)
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args(argv)
    meta, rows = vs_dense.read_vs_dense_json(args.json)
    sides = sorted({r.height for r in rows})
    plot_vs_dense(
        rows,
        args.img,
        title="CPU, B=1, C=64, fp32, 1 thread: forward+backward time / dense SDPA (< 1: faster)",
    )
    ok = [r for r in rows if r.status == "ok" and r.height == sides[-1]]
    above = sorted(r.name for r in ok if r.time_ratio >= 1.0)
    skipped = sorted({r.name for r in rows if r.status != "ok"})
    body = [
        "## Versus dense attention (CPU)",
        "",
        "Every block against dense multi-head SDPA (`visattn.bench.DenseAttention`: linear q/k/v, "
        "`scaled_dot_product_attention` over all H·W tokens, output projection, residual) with the block's own head",
        f"count, B=1, C=64, float32, forward+backward in training mode, square maps {', '.join(map(str, sides))}.",
        f"Machine: {meta['machine']}; load average {meta['load_before']} before and {meta.get('load_after', '?')}",
        f"after ({meta.get('minutes', '?')} min, started {meta['started']}): a shared machine, so each ratio is the",
        f"median over {meta['rounds']} round(s) of block / dense timed back to back (alternating which goes first);",
        "absolute times are not quoted. Memory is the saved-activation ratio (deterministic). Crossover: the smallest",
        "side of the grid from which the block beats dense at every larger side (`none`: not even at the largest).",
        f"A row whose single call took more than {meta['max_call_s']:g} s is `skipped` (the measurement would take",
        "minutes). Bold: at or above 1.0x dense. Rerun: the commands at the top of `tools/benchmarks_doc.py`,",
        "or `visattn bench --vs-dense` for a few blocks.",
        "",
        "![versus dense](img/vs_dense.png)",
        "",
        vs_dense.markdown_vs_dense(rows, reasons=REASONS),
        "",
        f"At {sides[-1]}x{sides[-1]}: {len(ok) - len(above)} of {len(ok)} measured blocks are faster than dense;"
        f" at or above 1.0x: {', '.join(f'`{n}`' for n in above) or 'none'}"
        + (f"; skipped or failed: {', '.join(f'`{n}`' for n in skipped)}." if skipped else "."),
    ]
    for later in meta.get("remeasured", []):
        body.append(
            f"\nRe-measured in a later run ({later['started']}, load average {later.get('load_before', '?')} "
            f"before and {later.get('load_after', '?')} after, rows skipped above {later.get('max_call_s', '?')} "
            f"s; merged by `tools/benchmarks_doc.py vs-dense-merge`): "
            + ", ".join(f"`{n}`" for n in later["names"])
            + "."
        )
    page = args.page.read_text()
    atomic_write_text(args.page, vs_dense.replace_section(page, "\n".join(body)))
    print(f"wrote {args.page} and {args.img / 'vs_dense.png'}")


def vs_dense_merge(argv: list[str]) -> None:
    """Replace the rows of the blocks re-measured in a later ``vs-dense-measure --names ...`` run (a block
    skipped under load, or changed since); the page then names them, with that run's time and load."""
    from visattn.bench import vs_dense

    parser = argparse.ArgumentParser(prog="benchmarks_doc.py vs-dense-merge")
    parser.add_argument("base", type=Path, help="the docs' JSON (rewritten)")
    parser.add_argument("new", type=Path, help="the later run")
    args = parser.parse_args(argv)
    meta, rows = vs_dense.read_vs_dense_json(args.base)
    new_meta, new_rows = vs_dense.read_vs_dense_json(args.new)
    settings = {(m["batch"], m["channels"], m["dtype"]) for m in (meta, new_meta)}
    if not new_rows or len(settings) > 1:
        raise SystemExit(f"vs-dense-merge: {args.new} has no rows or other settings than {args.base}")
    names = sorted({r.name for r in new_rows})
    merged = [r for r in rows if r.name not in names] + list(new_rows)
    later = {k: new_meta.get(k) for k in ("started", "load_before", "load_after", "max_call_s")}
    meta = {**meta, "remeasured": [*meta.get("remeasured", []), {**later, "names": names}]}
    vs_dense.write_vs_dense_json(sorted(merged, key=lambda r: (r.name, r.height)), args.base, meta=meta)
    print(f"merged {len(new_rows)} rows of {', '.join(names)} into {args.base}")


def main() -> None:
    if sys.argv[1:2] == ["vs-dense-measure"]:
        return vs_dense_measure(sys.argv[2:])
    if sys.argv[1:2] == ["vs-dense-doc"]:
        return vs_dense_doc(sys.argv[2:])
    if sys.argv[1:2] == ["vs-dense-merge"]:
        return vs_dense_merge(sys.argv[2:])
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
