"""The model zoo index (``model_zoo/segmentation.yaml``) and checkpoint downloads.

Downloads go through torch.hub: ``torch.hub.download_url_to_file`` writes to a temporary file next to
the target and renames it only after the whole file arrived and its SHA-256 starts with the hash prefix
in the file name (torch.hub's ``check_hash`` convention), so the cache never holds a partial or corrupt
file. Files load with ``torch.load(weights_only=True)`` and are converted from mmseg's layout on load.

The cache is ``$VISATTN_HOME/checkpoints`` when ``VISATTN_HOME`` is set, else torch.hub's
(``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``). Offline, place the file
there under its published name, or pass ``checkpoint_path=`` to ``create_segmentor``.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import hashlib
import os
import re
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import torch

from .errors import VisattnError

__all__ = [
    "CheckpointError",
    "checkpoint_dir",
    "download_checkpoint",
    "list_pretrained",
    "load_checkpoint_file",
    "load_pretrained",
    "pretrained_path",
    "load_zoo",
    "package_data_file",
    "zoo_config",
    "zoo_entry",
    "zoo_file",
]

_HASH_RE = re.compile(r"-([a-f0-9]{8,64})\.[A-Za-z0-9]+$")


class CheckpointError(VisattnError, RuntimeError):
    """A checkpoint that cannot be downloaded, fails its hash check, or cannot be read."""


def package_data_file(relative: str) -> Path:
    """A file of the package's run-time data (``visattn/_data/<relative>``), read through
    ``importlib.resources`` so a checkout, an editable install and an installed wheel find the same file.

    In the repository ``visattn/_data/`` links to the top-level ``model_zoo/`` and ``configs/demo.yaml``
    (the one source); a wheel carries copies of their targets. Raises FileNotFoundError naming the file
    and the likely cause when it is missing.
    """
    from importlib.resources import as_file, files

    resource = files("visattn").joinpath("_data", *relative.split("/"))
    if isinstance(resource, Path):
        path = resource
    else:
        # A zipped install: extract once; the extracted file lives as long as the process.
        path = _extract(resource, as_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"visattn's package data file _data/{relative} is missing at {path}: the installation is "
            "incomplete (a wheel built without its package data, or a checkout whose symbolic links in "
            "visattn/_data/ were not created, e.g. git with core.symlinks=false); reinstall visattn"
        )
    return path


_EXTRACTED: list[Any] = []


def _extract(resource: Any, as_file: Any) -> Path:
    context = as_file(resource)
    path = Path(context.__enter__())
    _EXTRACTED.append(context)  # kept open: the temporary file must outlive this call
    return path


def zoo_file() -> Path:
    """Path of the zoo index: ``$VISATTN_ZOO`` when set, else the package data copy of the repository's
    ``model_zoo/segmentation.yaml`` (:func:`package_data_file`)."""
    override = os.environ.get("VISATTN_ZOO")
    if override:
        return Path(override)
    return package_data_file("model_zoo/segmentation.yaml")


@functools.lru_cache(maxsize=4)
def _load_zoo(path: str, mtime: float) -> dict[str, dict[str, Any]]:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    entries = data.get("models", []) if isinstance(data, dict) else []
    zoo: dict[str, dict[str, Any]] = {}
    for entry in entries:
        name = entry.get("name")
        if not name or name in zoo:
            raise ValueError(f"{path}: every zoo entry needs a unique name (got {name!r})")
        zoo[name] = entry
    return zoo


def load_zoo() -> dict[str, dict[str, Any]]:
    """All zoo entries by name (read from :func:`zoo_file`)."""
    path = zoo_file()
    if not path.is_file():
        raise FileNotFoundError(f"the model zoo index {path} is missing (set VISATTN_ZOO to its location)")
    return {k: dict(v) for k, v in _load_zoo(str(path), path.stat().st_mtime).items()}


def list_pretrained(filter: str = "*") -> list[str]:
    """Sorted zoo names matching the fnmatch pattern ``filter`` (e.g. ``"ccnet_*"``)."""
    try:
        names = load_zoo()
    except FileNotFoundError:
        return []
    return sorted(n for n in names if fnmatch.fnmatchcase(n, filter))


def zoo_entry(name: str) -> dict[str, Any]:
    """The zoo entry ``name``: config, dataset, mIoU, url, hash, source, license."""
    zoo = load_zoo()
    if name not in zoo:
        close = difflib.get_close_matches(str(name), zoo, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown zoo model {name!r}.{hint} See visattn.hub.list_pretrained().")
    return zoo[name]


def zoo_config(name: str) -> dict[str, Any]:
    """The segmentor config of zoo entry ``name`` (architecture plus the dataset's data settings)."""
    entry = zoo_entry(name)
    cfg = dict(entry["config"])
    cfg["name"] = name
    data = {
        "dataset": entry.get("dataset"),
        "crop_size": entry.get("crop_size"),
        "test_scale": entry.get("test_scale"),
    }
    cfg["data"] = {**{k: v for k, v in data.items() if v is not None}, **(cfg.get("data") or {})}
    return cfg


def checkpoint_dir() -> Path:
    """Where downloaded checkpoints live: ``$VISATTN_HOME/checkpoints`` or torch.hub's cache."""
    home = os.environ.get("VISATTN_HOME")
    if home:
        return Path(home).expanduser() / "checkpoints"
    return Path(torch.hub.get_dir()) / "checkpoints"


def _file_name(url: str) -> str:
    name = os.path.basename(urlparse(url).path)
    if not name:
        raise ValueError(f"cannot derive a file name from URL {url!r}")
    return name


def hash_prefix_of(file_name: str) -> str | None:
    """The hex hash prefix of a file name ``<stem>-<hash>.<ext>`` (torch.hub's convention), or None."""
    match = _HASH_RE.search(file_name)
    return match.group(1) if match else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


PYTHON_HINT = "pass checkpoint_path='/path/to/file' to visattn.create_segmentor"


def _where_to_put(url: str, target: Path, hint: str | None = None) -> str:
    """The offline fix: the file to place and where, or ``hint`` (how this caller takes a local file;
    default: :data:`PYTHON_HINT`; the command line names its ``--checkpoint`` flag instead)."""
    return (
        f"Download {url} yourself and place it at {target} (the cache: $VISATTN_HOME/checkpoints if "
        f"VISATTN_HOME is set, else torch.hub's $TORCH_HOME/hub/checkpoints), or {hint or PYTHON_HINT}."
    )


def download_checkpoint(
    url: str,
    *,
    hash_prefix: str | None = "auto",
    progress: bool = True,
    model_dir: str | os.PathLike | None = None,
    hint: str | None = None,
) -> Path:
    """The local path of ``url``'s file, downloading it into the cache if needed.

    The file's SHA-256 must start with ``hash_prefix`` (``"auto"``: the prefix in the file name; None:
    no check), for a fresh download (checked by torch.hub before the file is moved into place) and for
    a file already in the cache. Raises :class:`CheckpointError` naming the URL and the local path;
    ``hint`` replaces the "pass checkpoint_path=..." part of its advice (the CLI names its flag).
    """
    directory = Path(model_dir) if model_dir is not None else checkpoint_dir()
    target = directory / _file_name(url)
    if hash_prefix == "auto":
        hash_prefix = hash_prefix_of(target.name)
    if target.is_file():
        if hash_prefix and not _sha256(target).startswith(hash_prefix):
            raise CheckpointError(
                f"{target} is in the cache but its SHA-256 does not start with {hash_prefix} "
                f"(the hash in the name of {url}): a corrupt or different file. Delete it to download again. "
                + _where_to_put(url, target, hint)
            )
        return target
    directory.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=hash_prefix, progress=progress)
    except RuntimeError as err:
        if "invalid hash value" in str(err):
            raise CheckpointError(
                f"the file downloaded from {url} failed its hash check ({err}); it was discarded, "
                f"nothing was written to {target}. " + _where_to_put(url, target, hint)
            ) from err
        raise
    except (URLError, OSError, ValueError) as err:
        raise CheckpointError(
            f"could not download {url} ({err}). " + _where_to_put(url, target, hint)
        ) from err
    return target


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file (.pth via ``weights_only=True``, or .safetensors), in
    visattn's layout (mmseg files are converted)."""
    from .models.convert import (
        checkpoint_state_dict,
        convert_mmseg,
        is_mmseg_state_dict,
        load_torch_checkpoint,
    )

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        raw = load_torch_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001 - any unreadable file becomes one clear error
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    state = checkpoint_state_dict(raw)
    return convert_mmseg(state) if is_mmseg_state_dict(state) else state


def pretrained_path(
    name: str | None,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
    hint: str | None = None,
) -> Path:
    """The local checkpoint file of zoo entry ``name`` (downloaded and hash-checked if needed), or
    ``checkpoint_path`` when given; ``hint``: see :func:`download_checkpoint`."""
    if checkpoint_path is not None:
        path = Path(checkpoint_path).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} does not exist")
        return path
    entry = zoo_entry(name)
    prefix = str(entry["hash"]) if entry.get("hash") else "auto"
    return download_checkpoint(entry["url"], hash_prefix=prefix, progress=progress, hint=hint)


def load_pretrained(
    model: torch.nn.Module,
    name: str | None,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> torch.nn.Module:
    """Load zoo checkpoint ``name`` (or the file ``checkpoint_path``) strictly into ``model``."""
    from .models.convert import load_state_dict_strict

    path = pretrained_path(name, checkpoint_path=checkpoint_path, progress=progress)
    load_state_dict_strict(model, load_checkpoint_file(path), source=str(path))
    return model
