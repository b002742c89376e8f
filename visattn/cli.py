"""The `visattn` command."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from pathlib import Path

from . import registry, tables
from .atomic import atomic_write_text
from .engine.cli import add_train_test_parsers
from .errors import (
    ArgumentParser,
    device_arg,
    exit_code,
    parse_size_list,
    positive_float,
    positive_int,
    run_command,
    size_list,
    writable_dir,
    writable_file,
)
from .predict_cli import add_predict_parser


def _cmd_list(args: argparse.Namespace) -> int:
    names = registry.list_attns(args.filter, causal=True if args.causal else None)
    print(tables.text_table(tables.block_rows(names)))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    info = registry.attn_info(args.name)  # an unknown name: ValueError with close names
    fields = dataclasses.fields(info)
    width = max(len(field.name) for field in fields)
    for field in fields:
        print(f"{field.name:>{width}}: {getattr(info, field.name)}")
    cls = registry.attn_class(args.name)
    print(f"{'class':>{width}}: {cls.__module__}.{cls.__qualname__}")
    print("\nconstructor arguments:")
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        default = "" if p.default is inspect.Parameter.empty else f" = {p.default!r}"
        print(f"  {p.name}{default}")
    return 0


def _cmd_docs(args: argparse.Namespace) -> int:
    out = Path(args.output)
    atomic_write_text(out, tables.markdown_blocks())
    print(f"wrote {out}")
    return 0


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"32,64x48"`` -> [(32, 32), (64, 48)]; ValueError naming the bad entry."""
    return parse_size_list(text)


def _check_blocks(names: list[str]) -> None:
    """ValueError for the first unknown block name, with close names (registry.attn_info's message)."""
    for name in names:
        registry.attn_info(name)


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import runner

    names = args.names or registry.list_attns(args.filter)
    if not names:
        raise ValueError(f"no block matches --filter {args.filter!r}; see `visattn list`")
    _check_blocks(names)
    if args.vs_dense and args.peers:
        raise ValueError("--vs-dense and --peers are separate runs: drop one of them (run the other after)")
    if args.compiled and (args.vs_dense or args.peers):
        other = "--vs-dense" if args.vs_dense else "--peers"
        raise ValueError(f"--compiled and {other} are separate runs: drop one of them (run the other after)")
    if args.plot:
        import importlib.util

        # Known before the sweep, not after minutes of measuring.
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib: pip install 'visattn[bench]' (or drop --plot)")
    if args.quick:
        sizes, batch, channels, min_run = [(16, 16), (32, 32)], 1, 64, 0.02
    else:
        # --sizes, --batch, --channels and --min-run-time were checked by their argparse types.
        sizes, batch, channels, min_run = args.sizes, args.batch, args.channels, args.min_run_time
    dtypes = [getattr(torch, d) for d in args.dtype]
    if args.vs_dense:
        from .bench import vs_dense

        vs_rows = vs_dense.sweep_vs_dense(
            names,
            sizes,
            batch=batch,
            channels=channels,
            dtypes=dtypes,
            device=args.device,
            rounds=args.rounds,
            min_time=min_run,
            progress=not args.no_progress,
        )
        print("versus dense multi-head SDPA (same B, C, heads, dtype, size; ratio block/dense, < 1 wins):")
        print(vs_dense.format_vs_dense(vs_rows))
        if args.csv:
            vs_dense.write_vs_dense_csv(vs_rows, args.csv)
        if args.json:
            meta = {"machine": vs_dense.machine_description(args.device), "load": vs_dense.load_average()}
            vs_dense.write_vs_dense_json(vs_rows, args.json, meta=meta)
        if args.plot:
            from .bench.plots import plot_vs_dense

            print(f"wrote {plot_vs_dense(vs_rows, args.plot)}")
        return 0 if all(r.status == "ok" for r in vs_rows) else 1
    if args.compiled:
        from .bench import compiled, vs_dense

        c_rows = compiled.sweep_compiled(
            names,
            sizes,
            batch=batch,
            channels=channels,
            dtypes=dtypes,
            device=args.device,
            rounds=args.rounds,
            backend=args.backend,
            min_time=min_run,
            progress=not args.no_progress,
        )
        print(
            "eager vs torch.compile(fullgraph=True), forward+backward "
            "(ratio compiled/eager, < 1: compiling pays):"
        )
        print(compiled.format_compiled(c_rows))
        if args.csv:
            compiled.write_compiled_csv(c_rows, args.csv)
        if args.json:
            meta = {"machine": vs_dense.machine_description(args.device), "load": vs_dense.load_average()}
            compiled.write_compiled_json(c_rows, args.json, meta=meta)
        return 0 if all(r.status == "ok" for r in c_rows) else 1
    rows = runner.run_sweep(
        names,
        sizes,
        batch=batch,
        channels=channels,
        dtypes=dtypes,
        device=args.device,
        min_run_time=min_run,
        progress=not args.no_progress,
    )
    print(runner.format_table(rows))
    fits = runner.fit_exponents(rows)
    if fits:
        print("\nfitted exponents in N = H*W (FLOPs declared in the registry):")
        for (name, dt), fit in sorted(fits.items()):
            parts = "  ".join(f"{k}: {v:.2f}" for k, v in fit.items())
            print(f"  {name:<20} {dt:<9} {parts}  declared FLOPs: {runner.declared_exponent(name)}")
    if args.peers:
        from .bench import peers

        peer_rows = peers.compare(
            names,
            batch=batch,
            channels=channels,
            size=sizes[-1],
            dtype=dtypes[0],
            device=args.device,
            min_run_time=min_run,
        )
        print("\npeers (ratio = ours / peer; < 1 is better):")
        print(peers.format_ratios(peer_rows))
    if args.csv:
        runner.write_csv(rows, args.csv)
    if args.json:
        runner.write_json(rows, args.json, meta={"device": args.device})
    if args.plot:
        from .bench.plots import plot_scaling

        for path in plot_scaling(rows, args.plot):
            print(f"wrote {path}")
    return 0 if all(r.status == "ok" for r in rows) else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from . import export

    if args.size is not None:
        (h, w), *more = _parse_sizes(args.size)
        if more:
            raise ValueError(f"--size takes one H[xW], got {args.size!r}")
    exp = export.resolve_exportable(
        args.name,
        channels=args.channels,
        attn=args.attn,
        checkpoint=args.checkpoint,
        random_weights=args.random_weights,
    )
    if args.size is None:
        # Blocks: a small map; models: one a network's strides leave more than one pixel of.
        h, w = (16, 20) if exp.kind == "block" else (64, 128)
    if exp.weights is not None:
        print(f"weights: {exp.weights}")
    elif exp.kind == "block":
        print(f"weights: {args.name} at its initialisation (a block has no trained weights of its own)")
    else:
        print(
            "note: random weights (--random-weights): the file holds the architecture with untrained weights; "
            "its outputs mean nothing until trained weights are exported (--checkpoint PATH)",
            file=sys.stderr,
        )
    report = export.export_to_file(
        exp, args.output, size=(h, w), batch=args.batch, dynamic=not args.static, fmt=args.format
    )
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if report.dynamic:
        shape = f"dynamic H, W (>= {report.min_hw}, traced at {h}x{w})"
    else:
        shape = f"fixed size {h}x{w}"
    kind = "ONNX" if report.format == "onnx" else "torch.export program"
    print(f"wrote {report.path} ({kind}, {shape})")
    if report.max_errors:
        checker = "onnxruntime" if report.format == "onnx" else "the exported program"
        at = ", ".join(f"{e:.2e} at {a}x{b}" for e, (a, b) in zip(report.max_errors, report.sizes))
        print(f"parity ({checker} vs eager) on {report.checked_on}: max abs error {at}")
    return 0


def _cmd_support(args: argparse.Namespace) -> int:
    from . import export

    names = args.names or registry.list_attns()
    _check_blocks(names)
    rows = []
    for name in names:
        row = export.support_row(name)
        print(
            f"{name:<20} fullgraph={row.compile_fullgraph} export={row.torch_export} onnx={row.onnx_export} "
            f"err={row.onnx_max_error} dynamic={row.dynamic_hw} {row.note}",
            flush=True,
        )
        rows.append(row)
    if args.output:
        atomic_write_text(Path(args.output), export.support_markdown(rows))
        print(f"wrote {args.output}")
    return 0


def _cmd_viz(args: argparse.Namespace) -> int:
    from .viz.command import run_viz  # the viz extra is imported only by its commands

    return run_viz(args)


def _cmd_explore(args: argparse.Namespace) -> int:
    from .viz.command import run_explore

    return run_explore(args)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="visattn", description="Efficient attention blocks for computer vision.")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (also: VISATTN_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="table of all blocks")
    p.add_argument("filter", nargs="?", default="*", help="fnmatch pattern, e.g. 'perf*'")
    p.add_argument("--causal", action="store_true", help="only blocks that accept causal=True")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="a block's AttnInfo and constructor arguments")
    p.add_argument("name")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("bench", help="measure time, FLOPs and memory of blocks over sizes")
    p.add_argument("names", nargs="*", help="block names (default: all matching --filter)")
    p.add_argument("--filter", default="*", help="fnmatch pattern over block names")
    p.add_argument("--sizes", type=size_list, default="32,64", help="comma-separated H[xW], e.g. 32,64x48")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--channels", type=positive_int, default=256)
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--min-run-time", type=positive_float, default=0.2, help="seconds per timing (torch.utils.benchmark)"
    )
    p.add_argument("--quick", action="store_true", help="B=1, C=64, 16x16 and 32x32, short timings")
    p.add_argument("--peers", action="store_true", help="also time installed public implementations")
    p.add_argument(
        "--vs-dense",
        action="store_true",
        help="time and saved memory of each block over dense multi-head SDPA (same B, C, heads, dtype, size), "
        "and the crossover side over the square --sizes",
    )
    p.add_argument(
        "--compiled",
        action="store_true",
        help="time each block eager and under torch.compile(fullgraph=True) (same instance and input), with the "
        "compile time, graph breaks and max |compiled - eager| of output and input gradient",
    )
    p.add_argument(
        "--backend",
        choices=["inductor", "aot_eager", "eager"],
        default="inductor",
        help="--compiled: torch.compile backend",
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="--vs-dense, --compiled: interleaved rounds (median ratio)",
    )
    p.add_argument("--csv", type=writable_file, help="write the rows as CSV")
    p.add_argument("--json", type=writable_file, help="write the rows as JSON")
    p.add_argument("--plot", type=writable_dir, metavar="DIR", help="write log-log scaling PNGs into DIR")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "export",
        help="export a block, a timm model or a segmentor (zoo name, config or checkpoint) to ONNX or torch.export",
    )
    p.add_argument(
        "name",
        help="block name; zoo segmentor (its pretrained weights); timm model name; segmentor config YAML "
        "(with --checkpoint); or a checkpoint (prefix, .safetensors, work dir, .pth) whose run config.yaml "
        "lies beside it",
    )
    p.add_argument("--format", choices=["onnx", "export"], default="onnx")
    p.add_argument("-o", "--output", required=True, type=writable_file)
    p.add_argument("--size", help="example H[xW] (default: 16x20 for a block, 64x128 for a model)")
    p.add_argument("--batch", type=positive_int, default=2)
    p.add_argument("--channels", type=positive_int, default=32, help="block channels (blocks only)")
    p.add_argument("--attn", help="block to insert into a plain timm model")
    p.add_argument(
        "--checkpoint",
        help="weights to export: a checkpoint prefix (runs/x/iter_300), its .safetensors, a work dir (its "
        "latest) or a .pth/.safetensors file (visattn or mmseg layout); for a zoo name instead of downloading",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="export a model (not a block) with random weights: the graph only, for deployment tests",
    )
    p.add_argument(
        "--static", action="store_true", help="static H and W (default: dynamic where the model allows)"
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("support", help="run the deployment checks and write docs/support.md")
    p.add_argument("names", nargs="*")
    p.add_argument("-o", "--output", type=writable_file, help="markdown file to write (e.g. docs/support.md)")
    p.set_defaults(func=_cmd_support)

    p = sub.add_parser("docs", help="regenerate docs/blocks.md")
    p.add_argument("-o", "--output", type=writable_file, default="docs/blocks.md")
    p.set_defaults(func=_cmd_docs)

    from .viz.command import add_explore_arguments, add_viz_arguments  # argparse only, no plotting

    p = sub.add_parser("viz", help="a block's query map (what one pixel attends to) over a photo, as PNG")
    add_viz_arguments(p)
    p.set_defaults(func=_cmd_viz)

    p = sub.add_parser("explore", help="a local web page: pick a block, click a pixel, see its map live")
    add_explore_arguments(p)
    p.set_defaults(func=_cmd_explore)

    add_predict_parser(sub)
    add_train_test_parsers(sub)
    for command in sub.choices.values():
        # --debug after the subcommand too; SUPPRESS keeps an earlier `visattn --debug` from being reset.
        try:
            command.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )
        except argparse.ArgumentError:
            pass
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``visattn`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code: 0, 2 for a
    bad argument or a user error (one line on stderr), 1 for an internal error."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument already reported on one line
        return exit_code(exc)
    return run_command(f"visattn {args.command}", lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
