"""Checkpoints: the model as safetensors plus a small torch file (optimiser, scheduler, scaler, RNG
states, iteration) that loads with ``weights_only=True``; both written to a temporary file and renamed
(``os.replace``), so a crash never leaves a half-written checkpoint.

Reading is strict: :func:`read_checkpoint` parses both files completely, so a truncated or foreign file is
one :class:`visattn.hub.CheckpointError` naming it, and :func:`find_intact_checkpoint` walks a work dir's
checkpoints newest first to the newest one that reads (what ``--resume`` continues from)."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write

__all__ = [
    "checkpoint_candidates",
    "checkpoint_iteration",
    "checkpoint_prefix",
    "find_intact_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_weights",
    "read_checkpoint",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_FORMS = (
    "a checkpoint prefix (runs/x/iter_300), its .safetensors or .state.pt file, a work dir (its latest "
    "checkpoint), or a .pth/.pt/.safetensors file in visattn or mmseg layout"
)


# Keys a training state file must hold for a resume (the model itself is the .safetensors file).
RESUME_STATE_KEYS = ("iteration", "optimizer", "scheduler", "rng")
_ITER_NAME = re.compile(r"iter_(\d+)")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    state["python_pos"] = random.getstate()[2]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    work_dir: str | os.PathLike, model: torch.nn.Module, state: dict[str, Any], name: str
) -> Path:
    """Write ``<name>.safetensors`` (model) and ``<name>.state.pt`` (``state``), then point ``latest``
    at them (a one-line text file, also replaced atomically)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    model_path = work_dir / f"{name}.safetensors"
    atomic_write(
        model_path, lambda p: save_file(tensors, str(p), metadata={"iteration": str(state.get("iteration"))})
    )
    atomic_write(work_dir / f"{name}.state.pt", lambda p: torch.save(state, p))
    atomic_write(work_dir / "latest", lambda p: p.write_text(name + "\n"))
    return model_path


def latest_checkpoint(work_dir: str | os.PathLike) -> str | None:
    pointer = Path(work_dir) / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    return str(Path(work_dir) / name) if name else None


def checkpoint_prefix(path: str | os.PathLike) -> str:
    """``path`` without a ``.safetensors`` or ``.state.pt`` ending (the name both files share)."""
    text = os.fspath(path)
    for end in (".safetensors", ".state.pt"):
        if text.endswith(end):
            return text[: -len(end)]
    return text


def read_checkpoint(
    prefix: str | os.PathLike, *, require_state: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model tensors of ``<prefix>.safetensors`` and the state of ``<prefix>.state.pt`` (empty when
    absent and not ``require_state``), both parsed completely. A missing, truncated or unreadable file,
    or a state file without the keys a resume needs, raises :class:`visattn.hub.CheckpointError` naming
    the file."""
    from ..hub import CheckpointError

    prefix = checkpoint_prefix(prefix)
    model_path, state_path = Path(prefix + ".safetensors"), Path(prefix + ".state.pt")
    if not model_path.is_file():
        raise CheckpointError(f"checkpoint file {str(model_path)!r} does not exist")
    try:
        # load_file checks the header and that the tensors cover the whole file: truncation is caught.
        tensors = load_file(str(model_path))
    except Exception as err:  # noqa: BLE001 - safetensors' own error type carries no file name
        raise CheckpointError(
            f"checkpoint file {str(model_path)!r} is damaged or truncated ({err}); delete it or pass another"
        ) from err
    if not state_path.is_file():
        if require_state:
            raise CheckpointError(
                f"checkpoint {prefix!r} has no training state file {str(state_path)!r} (a save interrupted "
                "between its two files, or weights only): it cannot be resumed"
            )
        return tensors, {}
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zips fail as OSError, RuntimeError or EOFError
        raise CheckpointError(
            f"checkpoint file {str(state_path)!r} is damaged or truncated ({type(err).__name__}: {err}); "
            "delete it or pass another"
        ) from err
    if require_state:
        missing = [k for k in RESUME_STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise CheckpointError(
                f"checkpoint file {str(state_path)!r} lacks the training state {missing}: it cannot be resumed"
            )
    return tensors, state


def load_checkpoint(prefix: str | os.PathLike, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Load ``<prefix>.safetensors`` into ``model`` (strict) and return the state dict of
    ``<prefix>.state.pt`` (empty when absent); ``prefix`` may also be the .safetensors path. A damaged
    file raises :class:`visattn.hub.CheckpointError` naming it (:func:`read_checkpoint`)."""
    tensors, state = read_checkpoint(prefix)
    if model is not None:
        from ..models.convert import load_state_dict_strict

        load_state_dict_strict(model, tensors, source=checkpoint_prefix(prefix) + ".safetensors")
    return state


def checkpoint_iteration(prefix: str | os.PathLike) -> int | None:
    """The iteration in a checkpoint's name (``iter_300`` -> 300), or None for another name."""
    m = _ITER_NAME.fullmatch(Path(checkpoint_prefix(prefix)).name)
    return int(m.group(1)) if m else None


def checkpoint_candidates(work_dir: str | os.PathLike) -> list[str]:
    """The checkpoint prefixes of ``work_dir``, newest first: the one ``latest`` names, then every
    ``iter_<n>`` (weights or state file present) by decreasing ``n``."""
    work_dir = Path(work_dir)
    found: dict[str, int] = {}
    if work_dir.is_dir():
        for f in work_dir.iterdir():
            prefix = checkpoint_prefix(f.name)
            n = checkpoint_iteration(prefix)
            if n is not None and prefix != f.name:
                found[str(work_dir / prefix)] = n
    ordered = sorted(found, key=lambda p: -found[p])
    pointed = latest_checkpoint(work_dir)
    if pointed is not None:
        ordered = [pointed] + [p for p in ordered if p != pointed]
    return ordered


def find_intact_checkpoint(
    work_dir: str | os.PathLike, *, require_state: bool = True
) -> tuple[str, dict[str, torch.Tensor], dict[str, Any], list[str]] | None:
    """The newest checkpoint of ``work_dir`` that reads completely (:func:`checkpoint_candidates`,
    :func:`read_checkpoint`): ``(prefix, tensors, state, problems)``, where ``problems`` names each newer
    checkpoint skipped and why. None when the folder has no checkpoint; CheckpointError naming every
    file when none reads."""
    from ..hub import CheckpointError

    problems: list[str] = []
    candidates = checkpoint_candidates(work_dir)
    for prefix in candidates:
        try:
            tensors, state = read_checkpoint(prefix, require_state=require_state)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        return prefix, tensors, state, problems
    if not candidates:
        return None
    raise CheckpointError(
        f"no intact checkpoint in {str(work_dir)!r}: " + "; ".join(problems) + ". Start a new run instead"
    )


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The weights file that ``path`` names, in any of the forms predict, test, export and resume
    accept (:data:`CHECKPOINT_FORMS`); raises :class:`visattn.hub.CheckpointError` naming the path and
    the accepted forms when there is none."""
    from ..hub import CheckpointError

    text = os.fspath(path)
    p = Path(text).expanduser()
    if p.is_dir():
        prefix = latest_checkpoint(p)
        if prefix is None:
            raise CheckpointError(f"checkpoint {text!r} is a directory without a 'latest' checkpoint")
        p = Path(prefix + ".safetensors")
    elif text.endswith(".state.pt"):
        p = Path(text[: -len(".state.pt")] + ".safetensors").expanduser()
    elif not p.is_file() and Path(text + ".safetensors").expanduser().is_file():
        p = Path(text + ".safetensors").expanduser()
    if not p.is_file():
        raise CheckpointError(f"checkpoint {text!r} does not exist; give {CHECKPOINT_FORMS}")
    return p


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Load the weights that ``path`` names (:func:`resolve_checkpoint`) strictly into ``model``; an
    unreadable file or mismatched keys raise :class:`visattn.hub.CheckpointError` /ValueError naming
    the file. Returns the file loaded."""
    from ..hub import load_pretrained

    file = resolve_checkpoint(path)
    load_pretrained(model, None, checkpoint_path=file)
    return file
