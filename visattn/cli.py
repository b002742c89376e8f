"""The `visattn` command."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from pathlib import Path

from . import registry, tables


def _cmd_list(args: argparse.Namespace) -> int:
    names = registry.list_attns(args.filter, causal=True if args.causal else None)
    print(tables.text_table(tables.block_rows(names)))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    try:
        info = registry.attn_info(args.name)
    except ValueError as err:
        print(f"visattn: {err}", file=sys.stderr)
        return 2
    for field in dataclasses.fields(info):
        print(f"{field.name:>17}: {getattr(info, field.name)}")
    cls = registry.attn_class(args.name)
    print(f"{'class':>17}: {cls.__module__}.{cls.__qualname__}")
    print("\nconstructor arguments:")
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        default = "" if p.default is inspect.Parameter.empty else f" = {p.default!r}"
        print(f"  {p.name}{default}")
    return 0


def _cmd_docs(args: argparse.Namespace) -> int:
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tables.markdown_blocks())
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visattn", description="Efficient attention blocks for computer vision.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="table of all blocks")
    p.add_argument("filter", nargs="?", default="*", help="fnmatch pattern, e.g. 'perf*'")
    p.add_argument("--causal", action="store_true", help="only blocks that accept causal=True")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="a block's AttnInfo and constructor arguments")
    p.add_argument("name")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("docs", help="regenerate docs/blocks.md")
    p.add_argument("-o", "--output", default="docs/blocks.md")
    p.set_defaults(func=_cmd_docs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
