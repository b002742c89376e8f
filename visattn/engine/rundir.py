"""A work dir holds one run, and nothing in it is lost: what counts as a run, the refusal to start a
fresh run over one (or moving it aside on request), and the checks a resume passes before anything on
disk changes (checkpoint readable, config unchanged but for :data:`RESUME_MAY_CHANGE`, weights fit)."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from ..atomic import atomic_write_text
from ..errors import VisattnError
from .checkpoint import (
    checkpoint_iteration,
    checkpoint_prefix,
    find_intact_checkpoint,
    latest_checkpoint,
    read_checkpoint,
)

__all__ = [
    "RESUME_MAY_CHANGE",
    "RUN_FILES",
    "ResumeError",
    "ResumeFallbackWarning",
    "RunExistsError",
    "check_resume",
    "find_resume",
    "finished_metrics",
    "move_aside",
    "run_exists_message",
    "run_files",
    "truncate_log",
]

# Config keys that may differ between a run and its resume: they change how a run is watched, saved or
# executed, never the sequence of weights it computes (train.iters is not here: it reshapes the schedule).
RESUME_MAY_CHANGE = frozenset(
    {
        "train.work_dir",
        "train.device",
        "train.log_interval",
        "train.ckpt_interval",
        "train.eval_interval",
        "train.tensorboard",
        "data.num_workers",
    }
)
# What a run writes into its work dir besides its iter_<n> checkpoints: any of them means "a run is here".
RUN_FILES = ("config.yaml", "latest", "log.jsonl", "eval.json", "curves.png", "tb")


class RunExistsError(VisattnError):
    """A fresh run was started in a work dir that already holds a run; nothing was changed."""


class ResumeError(VisattnError):
    """A resume that cannot continue (no checkpoint, another config, another model); nothing was changed."""


class ResumeFallbackWarning(UserWarning):
    """The newest checkpoint was damaged and an older intact one is resumed instead."""


def run_files(work_dir: Path) -> list[Path]:
    """The files and folders of a run in ``work_dir`` (empty when there is none)."""
    if not work_dir.is_dir():
        return []
    found = [work_dir / name for name in RUN_FILES if (work_dir / name).exists()]
    found += sorted(
        f
        for f in work_dir.iterdir()
        if checkpoint_prefix(f.name) != f.name and checkpoint_iteration(f.name) is not None
    )
    return found


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def saved_iters(work_dir: Path) -> int | None:
    try:
        saved = yaml.safe_load((work_dir / "config.yaml").read_text())
        return int(saved["train"]["iters"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def run_exists_message(work_dir: Path, files: list[Path]) -> str:
    latest = latest_checkpoint(work_dir) if (work_dir / "latest").is_file() else None
    iterations = [checkpoint_iteration(f.name) for f in files]
    newest = (
        checkpoint_iteration(latest)
        if latest
        else max((n for n in iterations if n is not None), default=None)
    )
    total = saved_iters(work_dir)
    of = f" of {total}" if total else ""
    result = read_json(work_dir / "eval.json")
    if isinstance(result, dict) and isinstance(result.get("mIoU"), (int, float)):
        at = f"iteration {newest}{of}, " if newest is not None else ""
        what = f"a finished run ({at}mIoU {result['mIoU']:.2f} in eval.json)"
        resume = "--resume only re-reports a finished run"
    elif newest is not None:
        what = f"an unfinished run (latest checkpoint: iteration {newest}{of})"
        resume = "continue it with --resume"
    else:
        what = f"an unfinished run without a checkpoint ({', '.join(f.name for f in files)})"
        resume = "--resume needs a checkpoint, which it lacks"
    return (
        f"train.work_dir {str(work_dir)!r} already holds {what}; nothing was changed. {resume[0].upper()}"
        f"{resume[1:]}; or train into another folder with --work-dir DIR (--set train.work_dir=DIR); or pass "
        f"--replace (train(..., replace=True)) to move its files to {work_dir.name}.replaced-<UTC time> "
        "beside it and start anew here"
    )


def move_aside(work_dir: Path, files: list[Path]) -> Path:
    """Move a run's files into a new sibling folder ``<work_dir>.replaced-<UTC time>``; returns it."""
    base = work_dir.resolve()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = base.with_name(f"{base.name}.replaced-{stamp}"), 1
    while dest.exists():  # two replacements within one second keep both old runs
        dest, n = base.with_name(f"{base.name}.replaced-{stamp}-{n}"), n + 1
    dest.mkdir()
    for f in files:
        os.replace(f, dest / f.name)  # same file system: a rename, nothing copied or lost midway
    return dest


def find_resume(resume: str | bool, work_dir: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint to resume (prefix, tensors, state), read completely. A folder (``resume=True``: the
    work dir) falls back past damaged newer checkpoints with a warning; a named checkpoint must read."""
    folder = work_dir if resume is True else Path(os.fspath(resume)).expanduser()
    if folder.is_dir():
        found = find_intact_checkpoint(folder)
        if found is None:
            raise ResumeError(
                f"--resume: no checkpoint (iter_<n>.safetensors + .state.pt) in {str(folder)!r}; start "
                "without --resume, or pass the checkpoint to continue"
            )
        prefix, tensors, state, problems = found
        if problems:
            warnings.warn(
                f"--resume: skipped {len(problems)} damaged checkpoint(s) ({'; '.join(problems)}); "
                f"resuming from {prefix} (iteration {state['iteration']})",
                ResumeFallbackWarning,
                stacklevel=3,
            )
        return prefix, tensors, state
    text = os.fspath(resume)
    if not text.endswith((".safetensors", ".state.pt")) and Path(text).is_file():
        raise ResumeError(
            f"--resume {text!r}: not a visattn training checkpoint; give a prefix such as "
            "runs/x/iter_300 (its .safetensors and .state.pt files) or a work dir"
        )
    tensors, state = read_checkpoint(text, require_state=True)
    return checkpoint_prefix(text), tensors, state


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)


def config_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key.path: old -> new`` for every key that differs and may not change on resume."""
    a, b = flatten(saved), flatten(new)
    absent = "(absent)"
    return [
        f"{k}: {a.get(k, absent)!r} -> {b.get(k, absent)!r}"
        for k in sorted(set(a) | set(b))
        if not may_change(k) and a.get(k, absent) != b.get(k, absent)
    ]


def check_resume(cfg, work_dir: Path, prefix: str, tensors, state, model: nn.Module) -> int:
    """Check a resume before anything is written: the config against the run's saved config.yaml (that
    of the checkpoint's folder and of the work dir), the weights against the model. Returns the start
    iteration."""
    from .config import ConfigError, validate_config

    for path in dict.fromkeys(
        p.resolve() for p in (Path(prefix).parent / "config.yaml", work_dir / "config.yaml")
    ):
        if not path.is_file():
            continue
        try:
            saved = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ResumeError(
                f"--resume: cannot read the run's config {path} ({err}); nothing was changed"
            ) from None
        if not isinstance(saved, dict):
            raise ResumeError(f"--resume: the run's config {path} is not a mapping; nothing was changed")
        try:
            # Defaults added since the run was saved are filled in, so only real differences remain.
            saved = validate_config(saved, check_paths=False)
        except ConfigError:
            pass
        diffs = config_differences(saved, cfg)
        if diffs:
            raise ResumeError(
                f"--resume: the config differs from the run's {path} in {len(diffs)} key(s): "
                f"{'; '.join(diffs)}. Only {', '.join(sorted(RESUME_MAY_CHANGE))} may change on resume; "
                "resume with the saved config, or start a new run in another --work-dir. Nothing was changed"
            )
    from ..models.convert import load_state_dict_strict

    try:
        load_state_dict_strict(model, tensors, source=f"{prefix}.safetensors", load=False)
    except ValueError as err:
        raise ResumeError(f"--resume: {err} Nothing was changed") from None
    start = state["iteration"]
    total = cfg["train"]["iters"]
    if not isinstance(start, int) or not 0 <= start <= total:
        raise ResumeError(
            f"--resume: {prefix}.state.pt is at iteration {start!r}, outside this run's 0..{total} "
            "(train.iters); nothing was changed"
        )
    return start


def finished_metrics(work_dir: Path) -> dict[str, Any] | None:
    result = read_json(work_dir / "eval.json")
    return result if isinstance(result, dict) and "mIoU" in result and "IoU" in result else None


def truncate_log(path: Path, start: int) -> None:
    """Drop the log entries past iteration ``start`` (written by the run that died after the checkpoint),
    and any line it left half-written, so the resumed log continues without repeating iterations."""
    if not path.is_file():
        return
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        it = record.get("iter") if isinstance(record, dict) else None
        if isinstance(it, int) and it <= start:
            keep.append(line + "\n")
        elif line.strip():
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(keep))
