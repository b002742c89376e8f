"""Named timm models with visattn blocks: ``timm.create_model("visattn_resnet50_ccnet")``.

Class-valued kwargs (``attn_layer=partial(...)``) do not serialise into a timm ``config.json``; a
registered name does, so these names are how a model with attention is saved with
``timm.models.save_for_hf`` and loaded back with ``timm.create_model("local-dir:...")``.

Each entry's ``pretrained_cfg`` is the backbone's timm default; loading it fills the backbone and
leaves the attention at its initialisation; loading a saved visattn model fills both.

``visattn_model`` is the generic architecture behind any ``visattn.create_model`` result (its arguments
travel in ``config.json``'s ``model_args``): what ``visattn.models.hf.save_pretrained`` records, so
timm's ``local-dir:`` / ``hf-hub:`` loading rebuilds models that no registered name describes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import timm
from timm.models import FeatureListNet, load_pretrained, register_model

from ..registry import list_attns
from .backbones import _feature_info, create_model

__all__ = [
    "REGISTERED_BACKBONES",
    "REGISTERED_ATTNS",
    "registered_model_names",
    "default_cfgs",
    "visattn_model",
]

_logger = logging.getLogger("visattn")

REGISTERED_BACKBONES = ("resnet50", "resnet101")
REGISTERED_ATTNS = ("cbam", "gcnet", "ccnet", "axial", "emanet", "isa", "nonlocal")

default_cfgs: dict[str, dict[str, Any]] = {}


def _attention_keys(model, state_dict_keys) -> tuple[list[str], list[str]]:
    """Split keys the checkpoint lacks into attention keys (expected) and others (an error)."""
    inserted = [n for n, m in model.named_modules() if getattr(type(m), "attn_name", "")]
    missing = [k for k in model.state_dict() if k not in state_dict_keys]
    attention = [k for k in missing if any(k.startswith(n + ".") for n in inserted)]
    return attention, [k for k in missing if k not in attention]


def _build(backbone: str, attn: str, name: str, pretrained: bool = False, **kwargs: Any):
    cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    kwargs.pop("cache_dir", None)
    kwargs.pop("pretrained_model_args", None)
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
    cfg = dict(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else (cfg or default_cfgs[name]))
    cfg.update(overlay)
    cfg = {k: v for k, v in cfg.items() if v is not None}  # timm treats a missing field as its default
    cfg["architecture"] = name
    model = create_model(backbone, attn, pretrained=False, **kwargs)

    if pretrained:

        def check_keys(state_dict, model=model):
            unexpected = [k for k in state_dict if k not in model.state_dict()]
            attention, other = _attention_keys(model, state_dict)
            classifier = model.default_cfg.get("classifier", "fc")
            other = [k for k in other if not k.startswith(classifier + ".")]
            if unexpected or other:
                raise ValueError(
                    f"{name}: checkpoint does not match the model: unexpected keys {unexpected[:8]}, "
                    f"missing keys {other[:8]}"
                )
            if attention:
                _logger.info(
                    "%s: %d attention tensors not in the checkpoint keep their initialisation",
                    name,
                    len(attention),
                )
            return state_dict

        load_pretrained(
            model, pretrained_cfg=cfg, num_classes=model.num_classes, filter_fn=check_keys, strict=False
        )
    model.pretrained_cfg = model.default_cfg = cfg
    if features_only:
        info = _feature_info(model)
        indices = tuple(range(len(info))) if out_indices is None else tuple(out_indices)
        model = FeatureListNet(model, out_indices=indices)
    return model


def _entrypoint(backbone: str, attn: str):
    name = f"visattn_{backbone}_{attn}"

    def entrypoint(pretrained: bool = False, **kwargs: Any):
        return _build(backbone, attn, name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (
        f"timm {backbone} with visattn {attn!r} in every residual block of its last two stages."
    )
    return entrypoint


def registered_model_names() -> list[str]:
    return sorted(
        f"visattn_{b}_{a}" for b in REGISTERED_BACKBONES for a in REGISTERED_ATTNS if a in list_attns()
    )


def visattn_model(pretrained: bool = False, **kwargs: Any):
    """Any ``visattn.create_model`` result: ``timm.create_model("visattn_model", backbone=..., attn=...,
    attn_kwargs=..., stages=..., placement=...)``. This is the architecture that
    :func:`visattn.models.hf.save_pretrained` writes into ``config.json`` (arguments in ``model_args``), so
    ``timm.create_model("local-dir:PATH" or "hf-hub:ID", pretrained=True)`` rebuilds a saved model with
    its blocks and loads its weights."""
    from .hf import build_for_timm

    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("pretrained_model_args", None)  # timm's copy of model_args, already merged into kwargs
    cache_dir = kwargs.pop("cache_dir", None)
    return build_for_timm(pretrained, pretrained_cfg, cache_dir, kwargs)


def _register_all() -> None:
    default_cfgs["visattn_model"] = {"architecture": "visattn_model"}
    globals()["visattn_model"] = register_model(visattn_model)
    for backbone in REGISTERED_BACKBONES:
        base = dataclasses.asdict(timm.models.get_pretrained_cfg(backbone))
        for attn in REGISTERED_ATTNS:
            if attn not in list_attns():
                continue
            fn = _entrypoint(backbone, attn)
            default_cfgs[fn.__name__] = dict(base)
            globals()[fn.__name__] = register_model(fn)


_register_all()
