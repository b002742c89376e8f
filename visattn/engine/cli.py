"""``visattn train`` / ``visattn test`` (and tools/train.py, tools/test.py).

Single process: ``python tools/train.py [config.yaml] [--set optim.lr=0.02 ...]`` (no config: the
synthetic demo). Many GPUs or machines: ``torchrun --nproc_per_node=N tools/train.py config.yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_train_test_parsers", "main_test", "main_train"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: configs/demo.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        # Several pairs after one flag, as mmseg's --cfg-options; the flag may also repeat.
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config values, e.g. --set optim.lr=0.02 train.iters=500 (repeatable); "
        "values are YAML: 0.02, true, null, [512, 1024], {channels: 64}",
    )
    p.add_argument("--work-dir", help="shortcut for --set train.work_dir=...")


def _load(args: argparse.Namespace):
    """The checked config of ``args`` (file, ``--set`` pairs, ``--work-dir``). A bad config raises
    ConfigError (a ValueError) naming the key or file, which the command prints as one line, exit 2."""
    from .config import load_config

    overrides = list(args.overrides)
    if args.work_dir:
        overrides.append(f"train.work_dir={args.work_dir}")
    return load_config(args.config, overrides)


def run_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return 2
    import warnings

    from .trainer import TrainingInterrupted, train

    resume = True if args.resume == "auto" else args.resume
    if resume and args.replace:
        raise ValueError("--resume continues the run in the work dir and --replace moves it aside: pass one")

    def one_line(message, category, *_args, **_kwargs) -> None:
        # A warning (a skipped damaged checkpoint, ...) reads as one line, like the errors.
        print(f"visattn train: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = one_line
        try:
            train(cfg, resume=resume, progress=not args.no_progress, plot=args.plot, replace=args.replace)
        except TrainingInterrupted as stop:
            return stop.exit_code  # the trainer already said where it saved and how to resume
    return 0


def run_test(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint. The arguments, the config and the checkpoint's existence are checked
    before a model or a dataset is built; an unreadable checkpoint is an error naming the file."""
    from ..errors import check_writable, parse_positive_floats

    # A typo in --scales or an unwritable --out must not surface after a whole evaluation.
    if args.out:
        check_writable(args.out, "--out result file")
    try:
        scales = parse_positive_floats(args.scales) if args.scales else None
    except ValueError as err:
        raise ValueError(f"--scales: {err}") from None
    cfg = _load(args)
    import torch

    from ..data import build_dataset, build_val_transform
    from ..hub import CheckpointError
    from ..models.segmentor import build_segmentor
    from .checkpoint import CHECKPOINT_FORMS, load_weights, resolve_checkpoint
    from .dist import get_rank, init_distributed, is_main
    from .evaluate import evaluate, format_table

    if args.checkpoint:
        # Every form predict, export and resume accept (prefix, .safetensors, .state.pt, work dir, .pth).
        checkpoint = resolve_checkpoint(args.checkpoint)
    else:
        work_dir = cfg["train"]["work_dir"]
        try:
            checkpoint = resolve_checkpoint(work_dir)
        except CheckpointError:
            raise CheckpointError(
                f"no --checkpoint given and no checkpoint in train.work_dir {work_dir!r}; "
                f"pass --checkpoint PATH: {CHECKPOINT_FORMS}"
            ) from None
    device = cfg["train"]["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    init_distributed(device)
    if device.startswith("cuda") and torch.distributed.is_initialized():
        device = f"cuda:{get_rank() % torch.cuda.device_count()}"
    model = build_segmentor(cfg["model"], init_backbone=False)  # the checkpoint sets every weight
    load_weights(model, checkpoint)
    model.to(device)
    dataset = build_dataset(
        cfg["data"], False, build_val_transform(model.data_cfg["mean"], model.data_cfg["std"])
    )
    eval_cfg = dict(cfg["eval"])
    if args.mode:
        eval_cfg["mode"] = args.mode
    if args.flip:
        eval_cfg["flip"] = True
    if scales:
        eval_cfg["scales"] = scales
    metrics = evaluate(
        model,
        dataset,
        num_classes=cfg["data"]["num_classes"],
        eval_cfg=eval_cfg,
        ignore_index=cfg["train"]["ignore_index"],
        device=device,
        progress=not args.no_progress,
        out_json=args.out,
    )
    if is_main():
        print(format_table(metrics))
        if not args.out:
            print(json.dumps({k: metrics[k] for k in ("mIoU", "aAcc", "mAcc")}))
    return 0


def add_train_test_parsers(subparsers) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Add ``train`` and ``test`` to an argparse ``subparsers`` object."""
    tr = subparsers.add_parser("train", help="train a segmentor from a YAML config (default: synthetic demo)")
    _common(tr)
    tr.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="resume from the newest intact checkpoint of train.work_dir, or from the given checkpoint "
        "(prefix, .safetensors/.state.pt file or work dir); the config must match the run's config.yaml",
    )
    tr.add_argument(
        "--replace",
        action="store_true",
        help="the work dir holds a run: move its files to <work_dir>.replaced-<UTC time> and start anew",
    )
    tr.add_argument("--plot", action="store_true", help="write curves.png (loss, mIoU) at the end")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=run_train)
    te = subparsers.add_parser("test", help="evaluate a checkpoint: mIoU, per-class IoU, aAcc")
    _common(te)
    te.add_argument(
        "--checkpoint",
        help="a checkpoint prefix (runs/x/iter_300), its .safetensors or .state.pt file, a work dir (its latest), "
        "or an mmseg/visattn .pth (default: the latest of train.work_dir)",
    )
    te.add_argument("--mode", choices=["whole", "slide"], help="override eval.mode")
    te.add_argument("--flip", action="store_true", help="flip augmentation")
    te.add_argument("--scales", help="comma-separated test scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75")
    te.add_argument("--out", help="JSON result file")
    te.add_argument("--no-progress", action="store_true")
    te.set_defaults(func=run_test)
    return tr, te


def _main(command: str, argv: list[str] | None) -> int:
    """tools/train.py and tools/test.py: exactly ``visattn train`` / ``visattn test`` (same parser,
    one-line errors, exit codes, ``--debug``)."""
    from ..cli import main

    return main([command, *(sys.argv[1:] if argv is None else argv)])


def main_train(argv: list[str] | None = None) -> int:
    return _main("train", argv)


def main_test(argv: list[str] | None = None) -> int:
    return _main("test", argv)
