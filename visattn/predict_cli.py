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


def _parse_pair(text: str | None):
    if text is None:
        return None
    h, _, w = text.lower().partition("x")
    return (int(h), int(w or h))


def run_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from . import hub
    from .models import create_segmentor

    image_path = Path(args.image)
    if not image_path.is_file():
        print(f"visattn predict: image {image_path} does not exist", file=sys.stderr)
        return 2
    is_zoo = args.model in hub.list_pretrained()
    pretrained = is_zoo and not args.no_pretrained and args.checkpoint is None
    try:
        kwargs = {"checkpoint_path": args.checkpoint} if args.checkpoint else {}
        model = create_segmentor(args.model, pretrained=pretrained, **kwargs)
    except (ValueError, FileNotFoundError, hub.CheckpointError) as err:
        print(f"visattn predict: {err}", file=sys.stderr)
        return 2
    if not (pretrained or args.checkpoint):
        print("visattn predict: note: randomly initialised weights (no checkpoint loaded)", file=sys.stderr)
    model = model.to(torch.device(args.device)).eval()
    image = np.asarray(Image.open(image_path).convert("RGB"))
    labels = model.predict(
        image,
        mode=args.mode,
        crop_size=_parse_pair(args.crop_size),
        stride=_parse_pair(args.stride),
        resize=not args.no_resize,
    )
    labels = labels.cpu().numpy()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if model.num_classes <= 256:
        Image.fromarray(labels.astype(np.uint8), mode="L").save(out)
    else:
        Image.fromarray(labels.astype(np.uint16)).save(out)
    palette = palette_for(model.data_cfg.get("dataset"), model.num_classes)
    overlay_path = Path(args.overlay) if args.overlay else out.with_name(out.stem + "_overlay.png")
    Image.fromarray(overlay(image, labels, palette, args.alpha)).save(overlay_path)
    present = len(np.unique(labels))
    print(f"wrote {out} (label map {labels.shape[1]}x{labels.shape[0]}, {present} classes present)")
    print(f"wrote {overlay_path}")
    return 0


def add_predict_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``predict`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "predict",
        help="segment an image with a zoo model or a config; write the label map and a colour overlay",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("model", help="zoo name (see visattn.hub.list_pretrained()) or a segmentor config YAML")
    p.add_argument("image", help="input image (any format PIL reads)")
    p.add_argument("-o", "--output", default="prediction.png", help="label map PNG (default: prediction.png)")
    p.add_argument("--overlay", help="overlay PNG (default: <output>_overlay.png)")
    p.add_argument("--checkpoint", help="local checkpoint (.pth in mmseg or visattn layout, or .safetensors)")
    p.add_argument("--no-pretrained", action="store_true", help="do not download the zoo checkpoint")
    p.add_argument(
        "--mode", choices=["whole", "slide"], default="whole", help="whole image or sliding window"
    )
    p.add_argument("--crop-size", help="sliding-window size HxW (default: the zoo entry's crop)")
    p.add_argument("--stride", help="sliding-window stride HxW (default: 2/3 of the crop)")
    p.add_argument("--no-resize", action="store_true", help="skip the dataset's test-time resize")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the colours in the overlay")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_predict)
    return p
