"""Named timm models with visattn blocks: ``timm.create_model("visattn_resnet50_ccnet")``.

Class-valued kwargs (``attn_layer=partial(...)``) do not serialise into a timm ``config.json``; a
registered name does, so these names are how a model with attention is saved with
``timm.models.save_for_hf`` and loaded back with ``timm.create_model("local-dir:...")``.

Each entry's ``pretrained_cfg`` is the backbone's timm default; loading it fills the backbone and
leaves the attention at its initialisation; loading a saved visattn model fills both.

``REGISTERED_VITS`` names timm ViTs whose every attention layer runs an efficient method
(:mod:`visattn.models.vit`), e.g. ``visattn_vit_small_patch16_384_performer``: the method runs on timm's
pretrained q, k, v, so ``pretrained=True`` gives timm's weights with no key left out.

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
from .vit import is_vit_backbone, vit_mixers

__all__ = [
    "REGISTERED_BACKBONES",
    "REGISTERED_ATTNS",
    "REGISTERED_VITS",
    "registered_model_names",
    "default_cfgs",
    "visattn_model",
]

_logger = logging.getLogger("visattn")

REGISTERED_BACKBONES = ("resnet50", "resnet101")
REGISTERED_ATTNS = ("cbam", "gcnet", "ccnet", "axial", "emanet", "isa", "nonlocal")
# High-resolution ViTs (576 tokens at 384 px, growing with dynamic_img_size) with a linear-time mixer of
# each kind: kernel (performer), landmarks (nystrom), local windows with the class token global (longformer).
REGISTERED_VITS = (
    ("vit_small_patch16_384", "performer"),
    ("vit_small_patch16_384", "nystrom"),
    ("vit_small_patch16_384", "longformer"),
    ("vit_base_patch16_384", "performer"),
)

default_cfgs: dict[str, dict[str, Any]] = {}


def _attention_keys(model, state_dict_keys) -> tuple[list[str], list[str]]:
    """Split keys the checkpoint lacks into attention keys (expected) and others (an error)."""
    inserted = [n for n, m in model.named_modules() if getattr(type(m), "attn_name", "")]
    missing = [k for k in model.state_dict() if k not in state_dict_keys]
    attention = [k for k in missing if any(k.startswith(n + ".") for n in inserted)]
    return attention, [k for k in missing if k not in attention]


def _build(backbone: str, attn: str, name: str, pretrained: bool = False, **kwargs: Any):
    cfg = kwargs.pop("pretrained_cfg", None)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if any(overlay.get(k) for k in ("file", "url", "hf_hub_id", "hf_hub_filename")):
        # As timm does: custom_load describes the registry's own source (a ViT's original .npz), not a
        # file given here, which holds a native state dict unless the overlay says otherwise.
        overlay.setdefault("custom_load", False)
    kwargs.pop("cache_dir", None)
    kwargs.pop("pretrained_model_args", None)
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
    cfg = dict(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else (cfg or default_cfgs[name]))
    cfg.update(overlay)
    cfg = {k: v for k, v in cfg.items() if v is not None}  # timm treats a missing field as its default
    cfg["architecture"] = name
    vit = is_vit_backbone(backbone)
    if vit and features_only:
        # timm's ViTs give features through forward_intermediates (its "getter" wrapper), not hooks.
        kwargs.setdefault("dynamic_img_size", True)
    model = create_model(backbone, attn, pretrained=False, **kwargs)
    recorded = getattr(model, "_model_args", None)
    if isinstance(recorded, dict):
        # timm's save_for_hf writes these into config.json and passes them back to this entrypoint: the
        # mixer class (set again from the name) is no argument of it, the method's keywords are.
        recorded = {k: v for k, v in recorded.items() if k != "attn_layer"}
        if kwargs.get("attn_kwargs"):
            recorded["attn_kwargs"] = dict(kwargs["attn_kwargs"])
        model._model_args = recorded

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

        filter_fn = check_keys
        if vit:
            from timm.models.vision_transformer import checkpoint_filter_fn

            # timm's own conversion first (original JAX/npz layouts, position embeddings resampled to
            # the model's grid), as timm.create_model(backbone, pretrained=True) would apply it.
            def filter_fn(state_dict, model):
                return check_keys(checkpoint_filter_fn(state_dict, model), model)

        load_pretrained(
            model, pretrained_cfg=cfg, num_classes=model.num_classes, filter_fn=filter_fn, strict=False
        )
    model.pretrained_cfg = model.default_cfg = cfg
    if features_only and vit:
        from timm.models._features import FeatureGetterNet

        return FeatureGetterNet(model, out_indices=3 if out_indices is None else out_indices)
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
    if is_vit_backbone(backbone):
        entrypoint.__doc__ = (
            f"timm {backbone} whose every attention layer runs visattn {attn!r} on timm's q, k, v "
            "(timm's pretrained weights load with no key left out)."
        )
    else:
        entrypoint.__doc__ = (
            f"timm {backbone} with visattn {attn!r} in every residual block of its last two stages."
        )
    return entrypoint


def _combinations() -> list[tuple[str, str]]:
    cnn = [(b, a) for b in REGISTERED_BACKBONES for a in REGISTERED_ATTNS if a in list_attns()]
    mixers = set(vit_mixers())
    return cnn + [(b, a) for b, a in REGISTERED_VITS if a in mixers]


def registered_model_names() -> list[str]:
    return sorted(f"visattn_{b}_{a}" for b, a in _combinations())


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
    for backbone, attn in _combinations():
        fn = _entrypoint(backbone, attn)
        default_cfgs[fn.__name__] = dataclasses.asdict(timm.models.get_pretrained_cfg(backbone))
        globals()[fn.__name__] = register_model(fn)


_register_all()
