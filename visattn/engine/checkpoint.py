"""Checkpoints: the model as safetensors plus a small torch file (optimiser, scheduler, scaler, RNG
states, iteration) that loads with ``weights_only=True``; both written to a temporary file and renamed
(``os.replace``), so a crash never leaves a half-written checkpoint."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "latest_checkpoint",
    "load_checkpoint",
    "load_weights",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_FORMS = (
    "a checkpoint prefix (runs/x/iter_300), its .safetensors or .state.pt file, a work dir (its latest "
    "checkpoint), or a .pth/.pt/.safetensors file in visattn or mmseg layout"
)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


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
    _atomic(
        model_path, lambda p: save_file(tensors, str(p), metadata={"iteration": str(state.get("iteration"))})
    )
    _atomic(work_dir / f"{name}.state.pt", lambda p: torch.save(state, p))
    _atomic(work_dir / "latest", lambda p: p.write_text(name + "\n"))
    return model_path


def latest_checkpoint(work_dir: str | os.PathLike) -> str | None:
    pointer = Path(work_dir) / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    return str(Path(work_dir) / name) if name else None


def load_checkpoint(prefix: str | os.PathLike, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Load ``<prefix>.safetensors`` into ``model`` (strict) and return the state dict of
    ``<prefix>.state.pt`` (empty when absent); ``prefix`` may also be the .safetensors path."""
    prefix = str(prefix)
    if prefix.endswith(".safetensors"):
        prefix = prefix[: -len(".safetensors")]
    model_path = Path(prefix + ".safetensors")
    if not model_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(model_path)!r} does not exist")
    if model is not None:
        model.load_state_dict(load_file(str(model_path)), strict=True)
    state_path = Path(prefix + ".state.pt")
    return torch.load(state_path, map_location="cpu", weights_only=True) if state_path.is_file() else {}


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
