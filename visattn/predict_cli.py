"""``visattn predict MODEL IMAGE -o out.png``: the label map and a colour overlay of a segmentor's prediction.

MODEL is a zoo name (``visattn.hub.list_pretrained()``; its checkpoint is downloaded unless
``--no-pretrained``) or a segmentor config YAML. ``out.png`` gets the label map (one class index per
pixel, 8-bit greyscale; 16-bit for more than 256 classes) and ``out_overlay.png`` (or ``--overlay``)
the image blended with the dataset's palette (Cityscapes or ADE20K; a fixed pseudo-random palette
otherwise).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .atomic import atomic_write
from .errors import arg_type, check_writable, device_arg, fraction, size_pair

__all__ = ["add_predict_parser", "colorize", "overlay", "palette_for", "run_predict"]


def palette_for(dataset: str | None, num_classes: int):
    """(num_classes, 3) uint8 numpy palette: the dataset's, else a deterministic pseudo-random one."""
    import numpy as np

    from .models.palettes import DATASETS

    if dataset and dataset.lower() in DATASETS:
        palette = np.asarray(DATASETS[dataset.lower()]["palette"], dtype=np.uint8)
        if len(palette) >= num_classes:
            return palette[:num_classes]
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(num_classes, 3), dtype=np.uint8)


def colorize(labels, palette):
    """(H, W) class indices -> (H, W, 3) uint8 colours."""
    import numpy as np

    return np.asarray(palette, dtype=np.uint8)[np.asarray(labels)]


def overlay(image, labels, palette, alpha: float = 0.5):
    """The RGB image (H, W, 3) uint8 blended with the coloured labels (``alpha`` = weight of the colours)."""
    import numpy as np

    colours = colorize(labels, palette).astype(np.float32)
    return (
        (np.asarray(image, dtype=np.float32) * (1.0 - alpha) + colours * alpha)
        .round()
        .clip(0, 255)
        .astype(np.uint8)
    )


#: How the command line takes a local checkpoint (the offline advice names this, not ``checkpoint_path=``).
CLI_CHECKPOINT_HINT = "pass --checkpoint PATH to visattn predict"

# The label map must survive a round trip exactly: lossless formats only (JPEG would blur class indices).
_LABEL_MAP_EXTENSIONS = (".png", ".tif", ".tiff")


def _image_extension_ok(path: str, allowed: tuple[str, ...] | None) -> None:
    from PIL import Image

    Image.init()
    ext = Path(path).suffix.lower()
    if allowed is not None:
        if ext not in allowed:
            raise ValueError(
                f"label map {path!r} must be a lossless image file ({', '.join(allowed)}); "
                f"got {ext or 'no extension'}"
            )
    elif Image.registered_extensions().get(ext) not in Image.SAVE:
        raise ValueError(f"{path!r}: PIL cannot write images with extension {ext or '(none)'}; use .png")


def _check_label_map_path(text: str) -> str:
    check_writable(text, "label map")
    _image_extension_ok(text, _LABEL_MAP_EXTENSIONS)
    return text


def _check_overlay_path(text: str) -> str:
    check_writable(text, "overlay")
    _image_extension_ok(text, None)
    return text


_label_map_path = arg_type(_check_label_map_path, "label_map_path")
_overlay_path = arg_type(_check_overlay_path, "overlay_path")


def _read_image(path: Path):
    """The image at ``path`` as an (H, W, 3) uint8 array; ValueError naming the file if PIL cannot read it."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as err:  # noqa: BLE001 - not an image, truncated, too large ...: one error naming the file
        detail = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(
            f"image {str(path)!r} cannot be read as an image ({type(err).__name__}: {detail}); "
            "give a PNG, JPEG or other file PIL reads"
        ) from err


def run_predict(args: argparse.Namespace) -> int:
    """Segment ``args.image`` and write the label map and the overlay. Everything that can be checked
    cheaply (the image, the checkpoint, the output paths) is checked before a model is built."""
    import numpy as np
    import torch
    from PIL import Image

    from . import hub
    from .engine.checkpoint import resolve_checkpoint
    from .models import create_segmentor

    image_path = Path(args.image)
    if not image_path.is_file():
        what = "is a directory" if image_path.is_dir() else "does not exist"
        print(f"visattn predict: image {image_path} {what}; give an image file", file=sys.stderr)
        return 2
    image = _read_image(image_path)
    out = Path(args.output)
    overlay_path = Path(args.overlay) if args.overlay else out.with_name(out.stem + "_overlay.png")
    if not args.overlay:
        _check_overlay_path(str(overlay_path))  # the derived name is checked like an explicit one
    if overlay_path.absolute() == out.absolute():
        raise ValueError(f"--overlay {overlay_path} is the label map -o {out}; give two different files")
    explain_path = None
    if getattr(args, "explain", None) is not None:
        qx, qy = args.explain
        if not (qx < image.shape[1] and qy < image.shape[0]):
            raise ValueError(
                f"--explain {qx:g},{qy:g} lies outside the {image.shape[1]}x{image.shape[0]} image {image_path}; "
                f"give X < {image.shape[1]}, Y < {image.shape[0]}"
            )
        explain_path = out.with_name(out.stem + "_explain.png")
        _check_overlay_path(str(explain_path))
    is_zoo = args.model in hub.list_pretrained()
    if args.checkpoint:
        # Every form test and resume accept: prefix, .safetensors, .state.pt, work dir, .pth/.pt.
        checkpoint = resolve_checkpoint(args.checkpoint)
    elif is_zoo and not args.no_pretrained:
        checkpoint = hub.pretrained_path(args.model, hint=CLI_CHECKPOINT_HINT)
    else:
        checkpoint = None
    if checkpoint is not None:
        model = create_segmentor(args.model, checkpoint_path=checkpoint)
    else:
        model = create_segmentor(args.model)
        # The command prints its own one-line notice, after the outputs so that an error stays the only
        # line; the Python API's multi-line warning would repeat it.
        model.random_weights = False
    if args.mode == "slide" and args.crop_size is None and not model.data_cfg.get("crop_size"):
        raise ValueError(f"--mode slide needs --crop-size HxW: {args.model} sets no data.crop_size")
    model = model.to(torch.device(args.device)).eval()
    labels = model.predict(
        image, mode=args.mode, crop_size=args.crop_size, stride=args.stride, resize=not args.no_resize
    )
    labels = labels.cpu().numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    overlay_path.parent.mkdir(parents=True, exist_ok=True)
    if model.num_classes <= 256:
        atomic_write(out, Image.fromarray(labels.astype(np.uint8), mode="L").save)
    else:
        atomic_write(out, Image.fromarray(labels.astype(np.uint16)).save)
    palette = palette_for(model.data_cfg.get("dataset"), model.num_classes)
    atomic_write(overlay_path, Image.fromarray(overlay(image, labels, palette, args.alpha)).save)
    present = len(np.unique(labels))
    print(f"wrote {out} (label map {labels.shape[1]}x{labels.shape[0]}, {present} classes present)")
    print(f"wrote {overlay_path}")
    if explain_path is not None:
        _write_explanation(model, image, args.explain, explain_path, resize=not args.no_resize)
        print(
            f"wrote {explain_path} (what the decode head's attention used for pixel {args.explain[0]:g},{args.explain[1]:g})"
        )
    if checkpoint is None:
        print(
            "visattn predict: note: randomly initialised weights (no checkpoint loaded), so the labels mean "
            "nothing; pass --checkpoint PATH for trained weights",
            file=sys.stderr,
        )
    return 0


def _write_explanation(model, image, point, path: Path, *, resize: bool) -> None:
    """``--explain X,Y``: the query map of the decode head's attention block at image pixel ``point``.

    The block's input is captured in one whole-image forward pass; the map (``sum |d y_q / d x|`` over all
    input channels and 32 evenly spaced output channels, by autograd, with the model's own weights) is
    drawn over the photo on the block's grid.
    """
    import torch
    import torch.nn.functional as F

    from .layers.block import AttnBlock
    from .viz.maps import query_map, to_grid
    from .viz.render import Panel, compose, display_map, save_png

    blocks = [(n, m) for n, m in model.decode_head.named_modules() if isinstance(m, AttnBlock)]
    if not blocks:
        raise ValueError(
            f"--explain: the decode head ({type(model.decode_head).__name__}) has no attention block to explain; "
            "use a segmentor with an attention head (e.g. ccnet, gcnet, nonlocal)"
        )
    name, block = blocks[0]
    captured = []
    handle = block.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].detach()))
    try:
        with torch.no_grad():
            x = model.preprocess(image)
            h, w = x.shape[-2:]
            th, tw = model.test_size(h, w) if resize else (h, w)
            if (th, tw) != (h, w):
                x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
            model(x)
    finally:
        handle.remove()
    feats = captured[0][:1]
    gh, gw = feats.shape[-2:]
    cell = to_grid(point, image.shape[:2], (gh, gw))
    # 32 output channels: a head of 512 channels would cost 512 backward passes for the exact sum.
    m = query_map(block, feats, [cell], chunk=8, out_channels=32)[0]
    info = getattr(block, "attn_info", None)
    caption = f"{model.config.get('name') or 'segmentor'}: decode_head.{name}" + (
        f" ({info.name} — {info.title}, {info.complexity})" if info else ""
    )
    panel = Panel(
        f"|dy/dx| at ({point[0]:g}, {point[1]:g}) on the {gw}x{gh} head grid", display_map(m, cell), [point]
    )
    ih, iw = image.shape[:2]
    scale = min(1.0, 800 / max(ih, iw))
    save_png(
        compose(image, [[panel]], caption, (max(64, int(iw * scale)), max(64, int(ih * scale)) + 80)), path
    )


def add_predict_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``predict`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "predict",
        help="segment an image with a zoo model or a config; write the label map and a colour overlay",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("model", help="zoo name (see visattn.hub.list_pretrained()) or a segmentor config YAML")
    p.add_argument("image", help="input image (any format PIL reads)")
    p.add_argument(
        "-o",
        "--output",
        type=_label_map_path,
        default="prediction.png",
        help="label map PNG (default: prediction.png)",
    )
    p.add_argument("--overlay", type=_overlay_path, help="overlay image (default: <output>_overlay.png)")
    p.add_argument(
        "--checkpoint",
        help="local checkpoint: a visattn prefix (runs/x/iter_300), its .safetensors or .state.pt, a work dir "
        "(its latest checkpoint), or a .pth/.safetensors in mmseg or visattn layout",
    )
    p.add_argument("--no-pretrained", action="store_true", help="do not download the zoo checkpoint")
    p.add_argument(
        "--mode", choices=["whole", "slide"], default="whole", help="whole image or sliding window"
    )
    p.add_argument(
        "--crop-size", type=size_pair, help="sliding-window size HxW (default: the zoo entry's crop)"
    )
    p.add_argument("--stride", type=size_pair, help="sliding-window stride HxW (default: 2/3 of the crop)")
    p.add_argument("--no-resize", action="store_true", help="skip the dataset's test-time resize")
    p.add_argument(
        "--alpha", type=fraction, default=0.5, help="weight of the colours in the overlay, in [0, 1]"
    )
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu, cuda or cuda:N")
    from .viz.command import _query  # argparse type only; the viz extra is imported by --explain itself

    p.add_argument(
        "--explain",
        type=_query,
        metavar="X,Y",
        help="also write <output>_explain.png: what the decode head's attention used for image pixel X,Y",
    )
    p.set_defaults(func=run_predict)
    return p
