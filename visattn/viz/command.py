"""``visattn viz`` and ``visattn explore``: the command-line side of :mod:`visattn.viz`.

Everything that can be checked cheaply (block name and its causal mode, block arguments, image, query
points, output path) is checked before a block runs, and the PNG is written atomically.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import arg_type, parse_size, positive_int, writable_file

__all__ = ["add_explore_arguments", "add_viz_arguments", "parse_query", "run_explore", "run_viz"]


def parse_query(text: str) -> tuple[float, float]:
    """``"100,80"`` -> (100.0, 80.0): an image pixel X,Y; ValueError naming the text otherwise."""
    parts = str(text).split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        x, y = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"query {text!r} is not X,Y (image pixel column and row, e.g. 100,80)") from None
    if x < 0 or y < 0:
        raise ValueError(f"query {text!r} must have X, Y >= 0")
    return x, y


def parse_block_arg(text: str) -> tuple[str, object]:
    """``"recurrence=2"`` -> ("recurrence", 2): a block keyword and a YAML value."""
    import yaml

    key, sep, value = str(text).partition("=")
    if not sep or not key.strip().isidentifier():
        raise ValueError(f"block argument {text!r} is not KEY=VALUE (e.g. recurrence=2, kernel_size=3)")
    return key.strip(), yaml.safe_load(value)


def _wh(text: str) -> tuple[int, int]:
    """``"800x600"`` -> (800, 600), width x height in pixels (``"800"``: square)."""
    size = parse_size(text)  # "AxB" -> (A, B): read here as W x H
    if min(size) < 16:
        raise ValueError(f"figure size {text!r} must be at least 16x16 pixels")
    return size


_query = arg_type(parse_query, "query")
_block_arg = arg_type(parse_block_arg, "block_arg")
_figure_size = arg_type(_wh, "figure_size")


def add_viz_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``visattn viz``."""
    p.add_argument("name", help="block name (visattn list)")
    p.add_argument(
        "--image",
        default="astronaut",
        help="image file, or a photo bundled with scikit-image: astronaut (default), coffee, chelsea, rocket, "
        "camera, coins, immunohistochemistry",
    )
    p.add_argument(
        "--query", type=_query, nargs="+", help="query pixels X,Y of the image (default: its centre)"
    )
    p.add_argument("--causal", action="store_true", help="add the causal view next to the bidirectional one")
    p.add_argument(
        "--probs", action="store_true", help="add the softmax probabilities where the block has them"
    )
    p.add_argument("-o", "--output", type=writable_file, required=True, help="PNG to write")
    p.add_argument("--size", type=_figure_size, help="figure size WxH in pixels (default: 420 per panel)")
    p.add_argument("--grid", type=positive_int, default=32, help="feature-map cells on the longer side (32)")
    p.add_argument("--channels", type=positive_int, default=16, help="feature-map channels (16; at least 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the perturbed weights and features")
    p.add_argument(
        "--arg",
        type=_block_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="block hyperparameter (repeatable), e.g. --arg recurrence=2",
    )


def run_viz(args: argparse.Namespace) -> int:
    """``visattn viz``: check everything, compute the maps, write the PNG."""
    import inspect

    from ..registry import attn_class, attn_info
    from .images import load_image
    from .render import save_png, viz_figure

    attn_info(args.name)  # unknown name: ValueError with close names
    if args.causal and not attn_info(args.name).causal:
        raise ValueError(
            f"block {args.name!r} has no causal mode; drop --causal or pick one of `visattn list --causal`"
        )
    kwargs = dict(args.arg)
    accepted = list(inspect.signature(attn_class(args.name).__init__).parameters)[2:]
    bad = sorted(set(kwargs) - set(accepted) | ({"causal", "device", "dtype"} & set(kwargs)))
    if bad:
        raise ValueError(f"--arg {', '.join(bad)}: not a hyperparameter of {args.name}; it takes {accepted}")
    if args.channels < 3:
        raise ValueError(f"--channels must be at least 3 (the image's colours), got {args.channels}")
    image = load_image(args.image)
    ih, iw = image.shape[:2]
    queries = args.query or [(iw // 2, ih // 2)]
    for qx, qy in queries:
        if not (qx < iw and qy < ih):
            raise ValueError(
                f"--query {qx:g},{qy:g} lies outside the {iw}x{ih} image {args.image}; give X < {iw}, Y < {ih}"
            )
    fig = viz_figure(
        args.name,
        image,
        queries,
        causal=args.causal,
        grid=args.grid,
        channels=args.channels,
        size=args.size,
        probs=args.probs,
        seed=args.seed,
        block_kwargs=kwargs,
    )
    path = save_png(fig, args.output)
    print(f"wrote {path} ({fig.width}x{fig.height})")
    return 0


def add_explore_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``visattn explore``."""
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)"
    )
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--grid", type=positive_int, default=32, help="feature-map cells on the longer side (32)")
    p.add_argument("--channels", type=positive_int, default=8, help="feature-map channels (8; at least 3)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")


def run_explore(args: argparse.Namespace) -> int:
    """``visattn explore``: serve the explorer page until Ctrl-C."""
    from .server import make_server

    if args.channels < 3:
        raise ValueError(f"--channels must be at least 3 (the image's colours), got {args.channels}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    server = make_server(args.host, args.port, grid=args.grid, channels=args.channels)
    url = f"http://{server.server_address[0]}:{server.server_address[1]}/"
    print(f"visattn explorer on {url} (Ctrl-C stops it)", flush=True)
    if args.open:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
