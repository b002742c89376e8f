"""Save and load models in the Hugging Face layout: ``config.json``, ``model.safetensors``, ``README.md``.

A directory written by :func:`save_pretrained` (or :meth:`Segmentor.save_pretrained`) rebuilds exactly,
from the directory itself or from a Hugging Face Hub repository holding the same files:

- segmentors: ``visattn.create_segmentor("local-dir:PATH")`` / ``("hf-hub:org/name[@revision]")``;
- any ``visattn.create_model(...)`` result (not only the registered names): ``visattn.create_model(
  "local-dir:PATH")`` / ``("hf-hub:org/name")``, and, once visattn is imported (it registers the
  ``visattn_model`` architecture), ``timm.create_model("local-dir:PATH" or "hf-hub:org/name",
  pretrained=True)``.

``config.json`` records everything the rebuild needs: for a segmentor its resolved config (backbone,
head, block and their keyword arguments, classes, data normalisation, test mode), its class names and
palette; for a backbone the :func:`visattn.create_model` arguments (backbone, attn, attn_kwargs,
stages, placement, timm keyword arguments) in timm's ``model_args`` layout. Loading checks the whole
directory before returning (the config, every tensor of the weights file, every key and shape against
the rebuilt model): a corrupt or mismatched directory is one :class:`visattn.hub.CheckpointError` (or
ValueError) naming the file, and no half-loaded model is returned.

Saving is atomic: the files go into a temporary directory beside the target, which is renamed into
place only when all of them are written. A non-empty target is refused unless ``overwrite=True``, and
even then only when it holds a model saved by visattn (so a mistyped path never replaces other files).
Hub downloads go through ``huggingface_hub`` (its cache, ``HF_HOME``, ``HF_HUB_OFFLINE`` apply).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..hub import CheckpointError

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "SOURCE_PREFIXES",
    "WEIGHTS_NAME",
    "fetch",
    "is_hf_source",
    "load_model",
    "load_segmentor",
    "read_config",
    "record_model_args",
    "save_pretrained",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
SOURCE_PREFIXES = ("local-dir:", "hf-hub:")
FORMAT_VERSION = 1
TIMM_ARCHITECTURE = "visattn_model"
MODEL_ARGS_ATTR = "visattn_model_args"
# timm's keyword arguments that say where weights come from, not what the model is.
_NOT_ARCHITECTURE = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")
# Preprocessing facts copied from the backbone's timm pretrained_cfg, for timm.data.resolve_data_config.
_DATA_CFG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "first_conv")


def is_hf_source(name: Any) -> bool:
    """Whether ``name`` is a ``local-dir:PATH`` or ``hf-hub:org/name`` source."""
    return isinstance(name, str) and name.startswith(SOURCE_PREFIXES)


# -- recording how a model was built ------------------------------------------------------------------
def record_model_args(model: nn.Module, args: Mapping[str, Any]) -> None:
    """Remember on ``model`` the :func:`visattn.create_model` arguments that rebuild it (called there).

    Weight-source arguments (``pretrained``, ``pretrained_cfg_overlay``, ...) are left out: a saved
    model carries its own weights.
    """
    recorded = {k: copy.deepcopy(v) for k, v in args.items() if k not in _NOT_ARCHITECTURE}
    setattr(model, MODEL_ARGS_ATTR, recorded)


def _json_ready(value: Any, where: str) -> Any:
    """``value`` as JSON types (tuples become lists), or ValueError naming ``where``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(
                f"save_pretrained: {where} = {value!r} is not a finite number; JSON cannot hold it"
            )
        return value
    if isinstance(value, (list, tuple)):
        return [_json_ready(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(
                    f"save_pretrained: {where} has a non-string key {key!r}; config.json needs strings"
                )
            out[key] = _json_ready(item, f"{where}.{key}")
        return out
    raise ValueError(
        f"save_pretrained: {where} = {value!r} ({type(value).__name__}) cannot be written to config.json; "
        "build the model with a serialisable value instead (a name timm or visattn understands, e.g. "
        "act_layer='relu' rather than a class, a number or a list rather than an object)"
    )


# -- saving -----------------------------------------------------------------------------------------
def _segmentor_config(model: nn.Module, test_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    from ..predict_cli import palette_for
    from .palettes import DATASETS

    cfg = copy.deepcopy(model.config)
    if not cfg:
        raise ValueError(
            "save_pretrained: this Segmentor has no config (it was built by hand, not by "
            "visattn.create_segmentor / build_segmentor), so it cannot be rebuilt from config.json"
        )
    # The saved weights cover the whole model; rebuilding must not fetch timm's backbone weights.
    cfg["backbone_pretrained"] = False
    data = dict(model.data_cfg)
    dataset = data.get("dataset")
    meta = DATASETS.get(str(dataset).lower(), {}) if dataset else {}
    classes = list(meta.get("classes", ()))[: model.num_classes]
    if len(classes) != model.num_classes:
        classes = [str(i) for i in range(model.num_classes)]
    palette = palette_for(dataset, model.num_classes).tolist()
    test = {"mode": "whole", "crop_size": data.get("crop_size"), "stride": data.get("slide_stride")}
    test.update(dict(test_cfg or {}))
    test["scale"] = data.get("test_scale")
    return {
        "visattn": {"kind": "segmentor", "format_version": FORMAT_VERSION, "library_version": _version()},
        "name": cfg.get("name"),
        "num_classes": model.num_classes,
        "classes": classes,
        "palette": palette,
        "normalization": {"mean": data.get("mean"), "std": data.get("std"), "input_scale": "0-255 RGB"},
        "test": test,
        "config": cfg,
    }


def _model_config(model: nn.Module) -> dict[str, Any]:
    import timm

    args = getattr(model, MODEL_ARGS_ATTR, None)
    if args is None:
        raise ValueError(
            f"save_pretrained: this {type(model).__name__} was not built by visattn.create_model, so "
            "nothing records how to rebuild it; build it with visattn.create_model(backbone, attn, ...) "
            "(a model from timm.create_model('visattn_<backbone>_<attn>') saves with timm.models.save_for_hf)"
        )
    pretrained_cfg: dict[str, Any] = {}
    timm_cfg = timm.models.get_pretrained_cfg(args["backbone"], allow_unregistered=True)
    if timm_cfg is not None:
        source = timm_cfg.to_dict() if hasattr(timm_cfg, "to_dict") else vars(timm_cfg)
        pretrained_cfg = {k: source[k] for k in _DATA_CFG_KEYS if source.get(k) is not None}
    num_classes = getattr(model, "num_classes", None)
    config: dict[str, Any] = {
        "architecture": TIMM_ARCHITECTURE,
        "visattn": {"kind": "model", "format_version": FORMAT_VERSION, "library_version": _version()},
        "model_args": args,
        "pretrained_cfg": pretrained_cfg,
    }
    if isinstance(num_classes, int):
        config["num_classes"] = num_classes
    return config


def _version() -> str:
    from .. import __version__

    return __version__


def _card(
    config: Mapping[str, Any], train_config: Mapping[str, Any] | None, results: Mapping[str, Any] | None
) -> str:
    import yaml

    kind = config["visattn"]["kind"]
    if kind == "segmentor":
        cfg = config["config"]
        block = cfg.get("attn") if cfg.get("head") == "attn" else None
        title = cfg.get("name") or f"{cfg['backbone']} + {block or cfg['head']} segmentor"
        facts = [
            f"- backbone: `{cfg['backbone']}` (output stride {cfg.get('output_stride')})"
            + (f", attention `{cfg['backbone_attn']}` inside it" if cfg.get("backbone_attn") else ""),
            f"- decode head: `{cfg['head']}`" + (f" with block `{block}`" if block else ""),
            f"- classes: {config['num_classes']}"
            + (f" ({cfg['data'].get('dataset')})" if cfg["data"].get("dataset") else ""),
            f"- test mode: {config['test']['mode']}",
        ]
        load = (
            'model = visattn.create_segmentor("hf-hub:<org>/<name>")  # or "local-dir:/path/to/this/folder"'
        )
        use = "labels = model.predict(image)  # PIL image, numpy array or tensor"
        tags = ["visattn", "image-segmentation", "semantic-segmentation", "pytorch"]
    else:
        args = config["model_args"]
        title = f"{args['backbone']}" + (f" + {args['attn']}" if args.get("attn") else "")
        facts = [
            f"- timm backbone: `{args['backbone']}`",
            f"- attention block: `{args.get('attn')}`, placement {args.get('placement', 'block')}, "
            f"stages {args.get('stages') if args.get('stages') is not None else 'the last two'}",
        ]
        load = 'model = visattn.create_model("hf-hub:<org>/<name>")  # or "local-dir:/path/to/this/folder"'
        use = 'model = timm.create_model("hf-hub:<org>/<name>", pretrained=True)  # after `import visattn`'
        tags = ["visattn", "timm", "image-feature-extraction", "pytorch"]
    lines = [
        "---",
        "library_name: visattn",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {title}",
        "",
        f"Saved with visattn {config['visattn']['library_version']} (`save_pretrained`). Everything needed to "
        f"rebuild the model is in `{CONFIG_NAME}`; the weights are in `{WEIGHTS_NAME}`.",
        "",
        *facts,
        "",
        "## Use",
        "",
        "```python",
        "import timm, visattn" if kind != "segmentor" else "import visattn",
        "",
        load,
        use,
        "```",
        "",
    ]
    if results:
        lines += ["## Results", "", "| metric | value |", "| --- | --- |"]
        for key, value in results.items():
            if not isinstance(value, Mapping):
                lines.append(f"| {key} | {value} |")
        lines.append("")
    else:
        lines += ["## Results", "", "No evaluation results were given when this model was saved.", ""]
    if train_config:
        lines += [
            "## Training config",
            "",
            "```yaml",
            yaml.safe_dump(dict(train_config), sort_keys=False).rstrip(),
            "```",
            "",
        ]
    return "\n".join(lines)


def _read_run(run_dir: str | os.PathLike) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    import yaml

    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"save_pretrained: run_dir {run} is not a folder (give a training work dir)")
    train_config = results = None
    if (run / "config.yaml").is_file():
        train_config = yaml.safe_load((run / "config.yaml").read_text())
    if (run / "eval.json").is_file():
        try:
            results = json.loads((run / "eval.json").read_text())
        except ValueError as err:
            raise ValueError(f"save_pretrained: {run / 'eval.json'} is not valid JSON ({err})") from err
    if train_config is None and results is None:
        raise ValueError(f"save_pretrained: run_dir {run} holds neither config.yaml nor eval.json")
    return train_config, results


def _saved_by_visattn(directory: Path) -> bool:
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("visattn"), dict)


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    train_config: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
    run_dir: str | os.PathLike | None = None,
    test_cfg: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and a model card ``README.md`` into ``directory``.

    Args:
        model: a :class:`~visattn.models.segmentor.Segmentor` or a :func:`visattn.create_model` result.
        directory: the folder to create (or an empty one); with ``overwrite=True`` a folder that already
            holds a visattn save is replaced. Written atomically: a temporary folder beside it is renamed.
        train_config: the training config, shown in the model card (and its ``eval`` section, for a
            segmentor, becomes the recorded test mode unless ``test_cfg`` is given).
        results: evaluation results for the card (e.g. ``eval.json``: mIoU, aAcc, mAcc).
        run_dir: a training work dir; its ``config.yaml`` and ``eval.json`` fill ``train_config`` and
            ``results`` where those are not given.
        test_cfg: a segmentor's inference settings (``mode``: ``"whole"`` or ``"slide"``, ``crop_size``,
            ``stride``, ``scales``, ``flip``).

    Returns the directory. Raises ValueError (unserialisable arguments, a used directory) before
    anything is written.
    """
    from safetensors.torch import save_file

    from .segmentor import Segmentor

    target = Path(directory).expanduser()
    if run_dir is not None:
        run_config, run_results = _read_run(run_dir)
        train_config = train_config if train_config is not None else run_config
        results = results if results is not None else run_results
    if isinstance(model, Segmentor):
        if test_cfg is None and train_config and isinstance(train_config.get("eval"), Mapping):
            test_cfg = {k: v for k, v in train_config["eval"].items() if k != "max_images"}
        config = _segmentor_config(model, test_cfg)
    else:
        config = _model_config(model)
    config = _json_ready(config, CONFIG_NAME)
    card = _card(config, _json_ready(train_config, "train_config") if train_config else None, results)

    if target.exists() and not target.is_dir():
        raise ValueError(f"save_pretrained: {target} exists and is not a folder; choose a new folder")
    used = target.is_dir() and any(target.iterdir())
    if used and not overwrite:
        raise ValueError(
            f"save_pretrained: {target} is not empty; choose a new folder, or pass overwrite=True to replace "
            "a model saved there before"
        )
    if used and not _saved_by_visattn(target):
        raise ValueError(
            f"save_pretrained: {target} holds files that are not a visattn save (no {CONFIG_NAME} written by "
            "visattn); overwrite=True only replaces a folder save_pretrained wrote. Choose a new folder"
        )
    # Tensors are written contiguous and on the CPU, detached: what safetensors stores and loads.
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    shared = _shared_storage(state)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        save_file({k: v.clone() if k in shared else v for k, v in state.items()}, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CARD_NAME).write_text(card)
        if target.is_dir():
            if used:
                # Moved aside first, removed only once the new folder is in place.
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / target.name)
            else:
                target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        if old is not None and not target.exists() and (old / target.name).exists():
            os.replace(old / target.name, target)  # put the previous save back
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and target.exists():
            shutil.rmtree(old, ignore_errors=True)
    return target


def _shared_storage(state: Mapping[str, torch.Tensor]) -> set[str]:
    """Keys whose tensors share memory with an earlier key (safetensors refuses shared tensors)."""
    seen: dict[tuple[int, int], str] = {}
    shared = set()
    for key, tensor in state.items():
        if tensor.numel() == 0:
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen:
            shared.add(key)
        else:
            seen[ident] = key
    return shared


# -- loading ----------------------------------------------------------------------------------------
def fetch(source: str, *, cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The local ``config.json`` and ``model.safetensors`` of ``source`` (``local-dir:PATH`` or
    ``hf-hub:org/name[@revision]``, downloaded into huggingface_hub's cache if needed)."""
    if not is_hf_source(source):
        raise ValueError(f"expected 'local-dir:PATH' or 'hf-hub:org/name', got {source!r}")
    kind, _, ident = source.partition(":")
    if not ident:
        raise ValueError(f"{source!r} names no folder or repository after '{kind}:'")
    if kind == "local-dir":
        folder = Path(ident).expanduser()
        if not folder.is_dir():
            raise CheckpointError(
                f"{source}: {folder} is not a folder (expected one written by save_pretrained)"
            )
        files = [folder / CONFIG_NAME, folder / WEIGHTS_NAME]
        for file in files:
            if not file.is_file():
                raise CheckpointError(
                    f"{source}: {file} is missing; a saved model folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                    "(written by save_pretrained)"
                )
        return files[0], files[1]
    return _hub_files(source, ident, cache_dir)


def _hub_files(source: str, ident: str, cache_dir: str | os.PathLike | None) -> tuple[Path, Path]:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = ident.partition("@")
    found = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            found.append(
                Path(
                    huggingface_hub.hf_hub_download(
                        repo, name, revision=revision or None, cache_dir=cache_dir
                    )
                )
            )
        except LocalEntryNotFoundError as err:
            cache = os.fspath(cache_dir or constants.HF_HUB_CACHE)
            why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
            raise CheckpointError(
                f"{source}: {name} is not in the Hugging Face cache ({cache}) and {why}. Download the repository "
                f"on a machine with network (`hf download {repo}`) and copy the cache, or copy the files into a "
                f"folder and load 'local-dir:/path/to/folder'"
            ) from err
        except (HfHubHTTPError, OSError, ValueError) as err:
            raise CheckpointError(f"{source}: cannot get {name} from the Hugging Face Hub ({err})") from err
    return found[0], found[1]


def read_config(source: str, *, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The checked ``config.json`` of ``source`` (``local-dir:`` or ``hf-hub:``)."""
    config_file, _ = fetch(source, cache_dir=cache_dir)
    return _parse_config(source, config_file)


def _parse_config(source: str, config_file: Path) -> dict[str, Any]:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(
            f"{source}: {config_file} is not valid JSON ({err}); the folder is damaged"
        ) from err
    header = config.get("visattn") if isinstance(config, dict) else None
    if not isinstance(header, dict) or header.get("kind") not in ("segmentor", "model"):
        raise CheckpointError(
            f"{source}: {config_file} was not written by visattn's save_pretrained (no 'visattn' section naming "
            "the kind); a plain timm model loads with timm.create_model"
        )
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: {config_file} has format_version {header.get('format_version')!r}; this visattn reads "
            f"version {FORMAT_VERSION}. Upgrade visattn"
        )
    section = "config" if header["kind"] == "segmentor" else "model_args"
    if not isinstance(config.get(section), dict):
        raise CheckpointError(f"{source}: {config_file} lacks its '{section}' section; the folder is damaged")
    if header["kind"] == "model" and not isinstance(config[section].get("backbone"), str):
        raise CheckpointError(f"{source}: {config_file}: model_args.backbone must name a timm model")
    return config


def _read_weights(source: str, weights_file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(weights_file), device="cpu")
    except Exception as err:  # noqa: BLE001 - any unreadable file is one error naming it
        raise CheckpointError(
            f"{source}: cannot read {weights_file} ({type(err).__name__}: {err}); the file is damaged or not "
            "safetensors. Save the model again"
        ) from err


def _wrong_kind(source: str, found: str, wanted: str) -> CheckpointError:
    call = "create_segmentor" if found == "segmentor" else "create_model"
    what = "a segmentor" if found == "segmentor" else "a backbone (visattn.create_model result)"
    return CheckpointError(f"{source} holds {what}, not a {wanted}; load it with visattn.{call}({source!r})")


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, weights_file: Path) -> None:
    from .convert import load_state_dict_strict

    try:
        load_state_dict_strict(model, state, source=f"{source} ({weights_file})")
    except ValueError as err:
        raise CheckpointError(
            f"{err} The folder's {CONFIG_NAME} and {WEIGHTS_NAME} do not belong together."
        ) from err


def load_segmentor(source: str, *, cache_dir: str | os.PathLike | None = None, **overrides: Any):
    """The :class:`~visattn.models.segmentor.Segmentor` saved at ``source``, with its weights.

    ``overrides`` may only restate saved values (the weights fix the architecture); anything else is a
    ValueError naming the key.
    """
    from .segmentor import build_segmentor

    config_file, weights_file = fetch(source, cache_dir=cache_dir)
    config = _parse_config(source, config_file)
    if config["visattn"]["kind"] != "segmentor":
        raise _wrong_kind(source, config["visattn"]["kind"], "segmentor")
    cfg = dict(config["config"])
    for key, value in overrides.items():
        if _json_ready(value, key) != cfg.get(key):
            raise ValueError(
                f"create_segmentor({source!r}): the saved weights fix the model, so config key {key!r} cannot be "
                f"changed (saved: {cfg.get(key)!r}, given: {value!r}); build from the config with "
                f"visattn.hf.read_config({source!r})['config'] instead"
            )
    state = _read_weights(source, weights_file)
    try:
        model = build_segmentor(cfg)
    except ValueError as err:
        raise CheckpointError(
            f"{source}: {config_file} does not describe a buildable segmentor: {err}"
        ) from err
    _load_into(model, state, source, weights_file)
    model.random_weights = False
    return model


def load_model(source: str, *, cache_dir: str | os.PathLike | None = None, **timm_kwargs: Any) -> nn.Module:
    """The :func:`visattn.create_model` result saved at ``source``, with its weights.

    ``timm_kwargs`` may only add runtime options that do not change the weights' layout (``device``,
    ``dtype``); architecture arguments come from ``config.json``.
    """
    from .backbones import create_model

    config_file, weights_file = fetch(source, cache_dir=cache_dir)
    config = _parse_config(source, config_file)
    if config["visattn"]["kind"] != "model":
        raise _wrong_kind(source, config["visattn"]["kind"], "backbone")
    state = _read_weights(source, weights_file)
    args = dict(config["model_args"])
    for key, value in timm_kwargs.items():
        if key in args and _json_ready(value, key) != args[key]:
            raise ValueError(
                f"create_model({source!r}): {key}={value!r} differs from the saved {args[key]!r}; the saved "
                "weights fix the architecture"
            )
    args.update(timm_kwargs)
    backbone, attn = args.pop("backbone"), args.pop("attn", None)
    try:
        model = create_model(backbone, attn, pretrained=False, **args)
    except ValueError as err:
        raise CheckpointError(f"{source}: {config_file} does not describe a buildable model: {err}") from err
    _load_into(model, state, source, weights_file)
    return model


def build_for_timm(
    pretrained: bool, pretrained_cfg: Any, cache_dir: Any, kwargs: dict[str, Any]
) -> nn.Module:
    """timm's ``visattn_model`` entrypoint: rebuild from ``model_args`` (timm passes them as keyword
    arguments) and, with ``pretrained=True`` and a ``local-dir:`` / ``hf-hub:`` source, load the saved
    weights strictly; without a source, ``pretrained=True`` means timm's backbone weights."""
    import dataclasses

    from .backbones import create_model

    cfg = pretrained_cfg
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    cfg = dict(cfg) if isinstance(cfg, Mapping) else {}
    backbone = kwargs.pop("backbone", None)
    if not isinstance(backbone, str):
        raise ValueError(
            "timm.create_model('visattn_model', ...) needs backbone='<timm name>' (and attn=, attn_kwargs=, "
            "stages=, placement= as for visattn.create_model), or load a saved one: 'local-dir:PATH' / 'hf-hub:ID'"
        )
    attn = kwargs.pop("attn", None)
    source = cfg.get("source")
    saved = source in ("local-dir", "hf-hub")
    model = create_model(backbone, attn, pretrained=bool(pretrained and not saved), **kwargs)
    if pretrained and saved:
        where = f"local-dir:{cfg.get('file')}" if source == "local-dir" else f"hf-hub:{cfg.get('hf_hub_id')}"
        _, weights_file = fetch(where, cache_dir=cache_dir)
        _load_into(model, _read_weights(where, weights_file), where, weights_file)
    return model
