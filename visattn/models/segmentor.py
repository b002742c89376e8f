"""Semantic segmentation: a timm backbone, a decode head, an optional auxiliary FCN head.

``Segmentor`` is mmsegmentation's ``EncoderDecoder``: the backbone's last feature map goes to the decode
head, the one before it to the auxiliary head (training only), and the logits are upsampled bilinearly
(``align_corners=False``) to the input size. The ResNetV1c-D8 backbone of mmseg's zoo is timm's
``resnet50c`` / ``resnet101c`` with ``output_stride=8``.

``create_segmentor`` builds one from a zoo name (``model_zoo/segmentation.yaml``), a config dict or a
YAML file; ``pretrained=True`` loads the zoo checkpoint (see :mod:`visattn.hub`).
"""

from __future__ import annotations

import copy
import difflib
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import list_attns
from .backbones import create_model
from .heads import HEADS, AttnHead, DecodeHead, FCNHead

__all__ = [
    "DEFAULT_CONFIG",
    "Segmentor",
    "build_segmentor",
    "create_segmentor",
    "pop_attention_aux_losses",
    "resolve_config",
]

# mmseg's SegDataPreProcessor for every zoo model: RGB, 0-255 scale.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

DEFAULT_CONFIG: dict[str, Any] = {
    "name": None,
    "backbone": "resnet50c",
    "backbone_kwargs": {},
    "backbone_pretrained": False,
    "backbone_attn": None,
    "backbone_attn_kwargs": {},
    "output_stride": 8,
    "neck_kwargs": {},  # ViT backbones only: visattn.models.vit_backbone.NECK_DEFAULTS
    "head": "fcn",
    "head_kwargs": {},
    "attn": None,
    "attn_kwargs": {},
    "num_classes": 19,
    "dropout": 0.1,
    "aux": True,
    "aux_kwargs": {},
    "aux_weight": 0.4,
    "data": {},
}
DATA_KEYS = {
    "dataset": None,  # 'cityscapes' / 'ade20k': the palette and class names of predictions
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "test_scale": None,  # (long, short) bound of mmseg's keep-ratio test Resize, e.g. (2048, 1024)
    "crop_size": None,  # (h, w) of training crops and of sliding-window inference
    "slide_stride": None,  # (h, w) stride of sliding-window inference (default 2/3 of crop_size)
}
# mmseg's auxiliary FCNHead on the stage before the last.
AUX_DEFAULTS = {"channels": 256, "num_convs": 1, "concat_input": False}


def _pair(value: Any, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"{what} must be a positive int or a pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


def pop_attention_aux_losses(module: nn.Module) -> torch.Tensor | None:
    """The sum of the auxiliary losses that attention blocks left in ``aux_loss`` during the last training
    forward (routing's commitment loss, which pulls queries and keys to their centroids; compressive's
    reconstruction loss, the only signal its compression convolutions get), or None when there are none.
    Each is cleared once read, so a later forward that skips a block cannot hand back a loss whose graph was
    already freed."""
    total = None
    for m in module.modules():
        aux = getattr(m, "aux_loss", None)
        if isinstance(aux, torch.Tensor):
            total = aux if total is None else total + aux
            m.aux_loss = None
    return total


class Segmentor(nn.Module):
    """Backbone + decode head (+ auxiliary head in training), mmseg's ``EncoderDecoder``.

    ``segmentor(images)`` in eval mode returns logits (B, num_classes, H, W) at the input size; in
    training mode a dict of logits at the input size: ``"out"`` (decode head), ``"aux"`` (auxiliary head)
    and any extra outputs of the head (DANet: ``"pam"``, ``"cam"``), weighted by :attr:`loss_weights`
    in :meth:`loss`.

    Args:
        backbone: a timm ``features_only`` model returning (at least) the two last stages.
        decode_head: head on the last feature map.
        auxiliary_head: head on the feature map before it, used in training only (or None).
        aux_weight: loss weight of the auxiliary head (mmseg: 0.4).
        config: the resolved config it was built from (kept for reproducibility and the zoo data info).

    Attributes:
        random_weights: set by :func:`create_segmentor` for a zoo model built without its checkpoint;
            :meth:`predict` then warns once that the predictions come from random weights. Loading a state
            dict clears it; set it to False yourself after training the model in your own loop.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: DecodeHead,
        auxiliary_head: nn.Module | None = None,
        *,
        aux_weight: float = 0.4,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.aux_weight = float(aux_weight)
        self.config = copy.deepcopy(dict(config or {}))
        data = dict(DATA_KEYS)
        data.update(self.config.get("data") or {})
        self.data_cfg = data
        self.random_weights = False
        # A hook, not a load_state_dict override: it also runs when the segmentor is loaded as a
        # submodule (DDP, EMA wrappers). A plain function, so a deep copy's hook acts on the copy.
        self.register_load_state_dict_post_hook(_weights_loaded)

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    @property
    def loss_weights(self) -> dict[str, float]:
        weights = dict(self.decode_head.loss_weights)
        if self.auxiliary_head is not None:
            weights["aux"] = self.aux_weight
        return weights

    def extract_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.backbone(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"Segmentor: expected normalised images (B, 3, H, W), got {got}")
        size = images.shape[-2:]
        feats = self.extract_features(images)
        if not self.training:
            return self._resize(self.decode_head(feats[-1]), size)
        outputs = self.decode_head.forward_train(feats[-1])
        if self.auxiliary_head is not None:
            outputs["aux"] = self.auxiliary_head(feats[-2])
        return {k: self._resize(v, size) for k, v in outputs.items()}

    @staticmethod
    def _resize(logits: torch.Tensor, size) -> torch.Tensor:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        # Under torch.export the sizes are symbols: asking whether they are equal would become a guard
        # the exporter cannot prove for every H, W, so it only skips the resize when that is known;
        # interpolating to the same size is exact anyway.
        if all(statically_known_true(a == b) for a, b in zip(logits.shape[-2:], size)):
            return logits
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def loss(
        self, outputs: Mapping[str, torch.Tensor], target: torch.Tensor, *, ignore_index: int = 255
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted cross-entropy of every training output, plus the attention blocks' own auxiliary losses
        of the last forward as ``attn_aux`` (see :func:`pop_attention_aux_losses`); returns (total, {name: loss}).

        As mmseg's ``CrossEntropyLoss`` (``avg_non_ignore=False``): the per-pixel losses are averaged
        over all pixels, ignored ones counting as zero.
        """
        parts = {}
        for name, weight in self.loss_weights.items():
            if name not in outputs:
                raise KeyError(
                    f"Segmentor.loss: output {name!r} missing (train-mode forward gives {sorted(outputs)})"
                )
            ce = F.cross_entropy(outputs[name], target, ignore_index=ignore_index, reduction="none")
            parts[name] = weight * ce.mean()
        attn_aux = pop_attention_aux_losses(self)
        if attn_aux is not None:
            parts["attn_aux"] = attn_aux
        return sum(parts.values()), parts

    # -- inference ---------------------------------------------------------------------------------
    def inference(
        self,
        images: torch.Tensor,
        *,
        mode: str = "whole",
        crop_size: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Logits (B, num_classes, H, W) of normalised images, whole-image or by sliding window.

        ``mode="slide"`` is mmseg's ``slide_inference``: windows of ``crop_size`` (default the config's
        ``data.crop_size``) every ``stride`` (default ``data.slide_stride``, else 2/3 of the crop), the last
        window aligned with the border, overlapping logits averaged; a window larger than the image is
        the image itself.
        """
        if mode == "whole":
            return self(images)
        if mode != "slide":
            raise ValueError(f"Segmentor.inference: mode must be 'whole' or 'slide', got {mode!r}")
        crop = _pair(crop_size if crop_size is not None else self.data_cfg.get("crop_size"), "crop_size")
        if crop is None:
            raise ValueError(
                "Segmentor.inference: mode='slide' needs crop_size (the config's data.crop_size is unset)"
            )
        step = _pair(stride if stride is not None else self.data_cfg.get("slide_stride"), "stride")
        if step is None:
            step = (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
        (hc, wc), (hs, ws) = crop, step
        b, _, h, w = images.shape
        rows = max(h - hc + hs - 1, 0) // hs + 1
        cols = max(w - wc + ws - 1, 0) // ws + 1
        logits = images.new_zeros((b, self.num_classes, h, w))
        count = images.new_zeros((1, 1, h, w))
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * hs + hc, h), min(c * ws + wc, w)
                y1, x1 = max(y2 - hc, 0), max(x2 - wc, 0)
                logits[:, :, y1:y2, x1:x2] += self(images[:, :, y1:y2, x1:x2])
                count[:, :, y1:y2, x1:x2] += 1
        return logits / count

    def preprocess(self, image: Any) -> torch.Tensor:
        """One image (PIL, numpy HxWx3 / HxW, tensor 3xHxW / 1x3xHxW) -> normalised (1, 3, H, W) float.

        uint8 inputs are 0-255; float inputs must be in [0, 1] (torchvision's convention) and are
        scaled by 255. Colour order RGB. Normalised with the config's ``data.mean`` / ``data.std``
        (0-255 scale, mmseg's ``SegDataPreProcessor``).
        """
        x = _image_to_tensor(image)
        param = next(self.parameters())
        x = x.to(device=param.device, dtype=torch.float32)
        mean = torch.tensor(self.data_cfg["mean"], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.data_cfg["std"], device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(param.dtype if param.is_floating_point() else torch.float32)

    def test_size(self, h: int, w: int) -> tuple[int, int]:
        """The size mmseg's test pipeline resizes an h x w image to (keep-ratio ``Resize(test_scale)``,
        mmcv's ``rescale_size``); the image's own size when the config has no ``data.test_scale``."""
        scale = self.data_cfg.get("test_scale")
        if not scale:
            return h, w
        long_edge, short_edge = max(scale), min(scale)
        factor = min(long_edge / max(h, w), short_edge / min(h, w))
        return int(h * factor + 0.5), int(w * factor + 0.5)

    @torch.no_grad()
    def predict(
        self,
        image: Any,
        *,
        mode: str = "whole",
        crop_size: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
        resize: bool = True,
        return_logits: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Label map (H, W) int64 at the image's size, as mmseg's test pipeline computes it.

        The image is normalised with the zoo entry's mean/std, resized as the dataset's test pipeline
        does (``resize=True`` and a ``data.test_scale`` in the config), run whole or by sliding window
        (``mode="slide"``), and the logits are resized back to the image size before the argmax. A
        list of images gives a list of label maps; ``return_logits=True`` returns the (C, H, W) logits.
        Runs in eval mode and restores the previous mode.
        """
        if isinstance(image, (list, tuple)):
            return [
                self.predict(
                    im,
                    mode=mode,
                    crop_size=crop_size,
                    stride=stride,
                    resize=resize,
                    return_logits=return_logits,
                )
                for im in image
            ]
        self._warn_if_random()
        was_training = self.training
        self.eval()
        try:
            x = self.preprocess(image)
            h, w = x.shape[-2:]
            th, tw = self.test_size(h, w) if resize else (h, w)
            if (th, tw) != (h, w):
                x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
            logits = self.inference(x, mode=mode, crop_size=crop_size, stride=stride)
            logits = self._resize(logits, (h, w)).float()[0]
        finally:
            self.train(was_training)
        return logits if return_logits else logits.argmax(dim=0)

    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any):
        """Write ``config.json``, ``model.safetensors`` and a model card ``README.md`` into ``directory``
        (atomically; a non-empty folder only with ``overwrite=True``); ``create_segmentor("local-dir:DIR")``
        or, uploaded, ``"hf-hub:org/name"`` rebuilds this model exactly. Keywords (``overwrite``,
        ``train_config``, ``results``, ``run_dir``, ``test_cfg``): :func:`visattn.models.hf.save_pretrained`."""
        from .hf import save_pretrained

        return save_pretrained(self, directory, **kwargs)

    def _warn_if_random(self) -> None:
        if not self.random_weights or getattr(self, "_random_weights_warned", False):
            return
        self._random_weights_warned = True  # once per model: a loop over images should not repeat it
        name = self.config.get("name") or "this segmentor"
        warnings.warn(
            f"{name} has random weights (built without pretrained=True or checkpoint_path=), so its "
            f"predictions are meaningless. Load weights: visattn.create_segmentor({name!r}, pretrained=True), "
            "checkpoint_path='/path/to/checkpoint', or visattn.engine.checkpoint.load_weights(model, path) "
            "(on the command line: --checkpoint PATH).",
            UserWarning,
            stacklevel=4,  # past predict and torch.no_grad's wrapper: the caller's line
        )


def _weights_loaded(module: Segmentor, incompatible_keys) -> None:
    """load_state_dict post-hook: weights came from somewhere, so the random-weights warning is moot."""
    module.random_weights = False


def _image_to_tensor(image: Any) -> torch.Tensor:
    """(1, 3, H, W) float tensor on the 0-255 scale."""
    import numpy as np

    if (
        hasattr(image, "convert")
        and hasattr(image, "size")
        and not isinstance(image, (np.ndarray, torch.Tensor))
    ):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"predict: a numpy image must be (H, W, 3) RGB or (H, W), got shape {arr.shape}")
        tensor = torch.from_numpy(np.array(arr[..., :3])).permute(2, 0, 1)  # a copy: input may be read-only
    elif isinstance(image, torch.Tensor):
        tensor = image
        if tensor.dim() == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.dim() != 3 or tensor.shape[0] != 3:
            raise ValueError(
                f"predict: a tensor image must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}"
            )
    else:
        raise TypeError(f"predict: expected a PIL image, numpy array or tensor, got {type(image).__name__}")
    if tensor.dtype == torch.uint8:
        return tensor.float().unsqueeze(0)
    if not tensor.is_floating_point():
        raise ValueError(f"predict: image dtype {tensor.dtype} is neither uint8 (0-255) nor float (0-1)")
    tensor = tensor.float()
    if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1.0):
        raise ValueError(
            "predict: a float image must be in [0, 1] (got values in "
            f"[{tensor.min().item():.3g}, {tensor.max().item():.3g}]); pass uint8 for 0-255 images"
        )
    return (tensor * 255.0).unsqueeze(0)


# -- configs -------------------------------------------------------------------------------------------
def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key in ("data",) and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_config(name_or_cfg: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """The full config of a zoo name, a config dict or a YAML file, with ``overrides`` applied and
    every key checked before anything is built (:func:`visattn.engine.config.check_model_config`): an
    unknown key, a value of the wrong type or range, an unknown backbone, head or block, or a keyword
    the head or block does not take raises :class:`~visattn.engine.config.ConfigError` (a ValueError)
    naming the key."""
    from .. import hub
    from ..engine.config import ConfigError, check_model_config, read_yaml

    if isinstance(name_or_cfg, Mapping):
        cfg = dict(name_or_cfg)
    elif isinstance(name_or_cfg, str) and name_or_cfg.startswith(("local-dir:", "hf-hub:")):
        from .hf import read_config

        config = read_config(name_or_cfg)
        if config["visattn"]["kind"] != "segmentor":
            raise ValueError(f"{name_or_cfg} holds a backbone, not a segmentor; use visattn.create_model")
        cfg = dict(config["config"])
    elif isinstance(name_or_cfg, (str, os.PathLike)):
        text = os.fspath(name_or_cfg)
        if text in hub.list_pretrained():
            cfg = hub.zoo_config(text)
        elif text.endswith((".yaml", ".yml")) or os.path.isfile(text):
            if not os.path.isfile(text):
                raise FileNotFoundError(f"segmentor config file {text!r} does not exist")
            raw = read_yaml(text)
            if not raw:
                # An empty file must not quietly become the default segmentor.
                raise ConfigError(f"segmentor config file {text!r} is empty; see configs/demo.yaml")
            if not isinstance(raw, Mapping):
                raise ConfigError(f"{text}: a segmentor config must be a mapping, got {type(raw).__name__}")
            cfg = raw.get("model", raw)
            if not isinstance(cfg, Mapping) or not cfg:
                raise ConfigError(f"{text}: config key 'model' must be a non-empty mapping, got {cfg!r}")
            cfg = dict(cfg)
        else:
            close = difflib.get_close_matches(text, hub.list_pretrained(), n=5, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown segmentor {text!r}: neither a zoo name nor a YAML file.{hint} "
                "See visattn.hub.list_pretrained()."
            )
    else:
        raise TypeError(
            f"create_segmentor: expected a name, a path or a dict, got {type(name_or_cfg).__name__}"
        )
    cfg = _merge(cfg, overrides)
    # One checker for every key (type, range, names, constructor keywords): visattn.engine.config.
    check_model_config(cfg, prefix="")
    cfg = _merge(DEFAULT_CONFIG, cfg)
    if cfg["data"] is None:
        cfg["data"] = {}
    for key in ("backbone_kwargs", "backbone_attn_kwargs", "head_kwargs", "attn_kwargs", "aux_kwargs"):
        if cfg[key] is None:
            cfg[key] = {}
    return cfg


def _build_head(cfg: Mapping[str, Any], in_channels: int) -> DecodeHead:
    head = cfg["head"]
    kwargs = {"dropout": cfg["dropout"], **cfg["head_kwargs"]}
    if head in HEADS and head != "attn":
        if cfg["attn"] is not None:
            raise ValueError(f"config key 'attn' is only used with head 'attn', not with head {head!r}")
        cls = HEADS[head]
    else:
        attn = cfg["attn"] if head == "attn" else head
        if attn is None:
            raise ValueError("head 'attn' needs config key 'attn' (a block of visattn.list_attns())")
        if attn not in list_attns():
            # resolve_config reports this first; kept for configs that bypass it.
            what = "attn" if head == "attn" else "head"
            close = difflib.get_close_matches(str(attn), [*HEADS, *list_attns()], n=5, cutoff=0.5)
            raise ValueError(
                f"config key {what!r}: unknown {'attention block' if what == 'attn' else 'head'} {attn!r}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f"; heads: {sorted(HEADS)}, blocks: visattn.list_attns()"
            )
        cls = AttnHead
        kwargs.update(attn=attn, attn_kwargs=dict(cfg["attn_kwargs"]))
    return cls(in_channels, num_classes=cfg["num_classes"], **kwargs)


def build_segmentor(cfg: Mapping[str, Any], *, init_backbone: bool = True) -> Segmentor:
    """A :class:`Segmentor` from a resolved config (:func:`resolve_config`): the backbone initialised as
    ``backbone_pretrained`` says, the rest randomly. ``init_backbone=False`` skips the backbone init
    (no download) for a model whose weights are about to be loaded from a checkpoint."""
    cfg = resolve_config(cfg)
    num_classes = cfg["num_classes"]
    timm_kwargs = dict(cfg["backbone_kwargs"])
    # true: timm's weights; "open-mmlab://...": mmseg's (mmlab_init.py)
    init = cfg["backbone_pretrained"] if init_backbone else False
    from .vit import is_vit_backbone

    if is_vit_backbone(cfg["backbone"]):
        # A plain ViT has one stride: its blocks' token maps go through ViTDet's simple pyramid
        # (vit_backbone.py), one level for the decode head (and one for the auxiliary head).
        from .vit_backbone import build_vit_backbone

        if isinstance(init, str):
            raise ValueError(
                f"config key 'backbone_pretrained' ({init!r}) is mmseg's ResNet initialisation; for the ViT "
                f"{cfg['backbone']} use true (timm's weights) or false"
            )
        backbone = build_vit_backbone(
            cfg["backbone"],
            cfg["backbone_attn"],
            attn_kwargs=cfg["backbone_attn_kwargs"],
            pretrained=init is True,
            timm_kwargs=timm_kwargs,
            neck_kwargs=cfg.get("neck_kwargs"),
            output_stride=cfg["output_stride"],
            aux=bool(cfg["aux"]),
        )
    else:
        if cfg.get("neck_kwargs"):
            raise ValueError(
                f"config key 'neck_kwargs' configures a ViT backbone's feature pyramid; {cfg['backbone']} "
                "gives its own feature maps: remove it"
            )
        if cfg["output_stride"] is not None:
            timm_kwargs["output_stride"] = cfg["output_stride"]
        backbone = create_model(
            cfg["backbone"],
            cfg["backbone_attn"],
            attn_kwargs=cfg["backbone_attn_kwargs"] or None,
            pretrained=init is True,
            features_only=True,
            out_indices=(-2, -1),
            **timm_kwargs,
        )
        if isinstance(init, str):
            from .mmlab_init import load_open_mmlab_init

            load_open_mmlab_init(backbone, init, backbone_name=cfg["backbone"])
    in_channels = backbone.feature_info.channels()[-1]
    aux_channels = backbone.feature_info.channels()[-2] if cfg["aux"] else None
    decode_head = _build_head(cfg, in_channels)
    aux = None
    if cfg["aux"]:
        aux_kwargs = {**AUX_DEFAULTS, "dropout": cfg["dropout"], **cfg["aux_kwargs"]}
        aux = FCNHead(aux_channels, num_classes=num_classes, **aux_kwargs)
    return Segmentor(backbone, decode_head, aux, aux_weight=cfg["aux_weight"], config=cfg)


def create_segmentor(
    name_or_cfg: str | os.PathLike | Mapping[str, Any], *, pretrained: bool = False, **overrides: Any
) -> Segmentor:
    """A segmentor from a zoo name, a config dict or a YAML path.

    Zoo names are ``<method>_<r50|r101>-d8_<cityscapes-512x1024|ade20k-512x512>`` with method in
    ccnet, emanet, gcnet, isanet, nonlocal, dnl, danet, fcn (``visattn.hub.list_pretrained()``).
    ``pretrained=True`` downloads the zoo checkpoint into the torch.hub cache (or ``$VISATTN_HOME``),
    checks its hash and loads it strictly after converting mmseg's keys.

    ``"local-dir:PATH"`` / ``"hf-hub:org/name[@revision]"`` rebuild a segmentor saved with
    :meth:`Segmentor.save_pretrained` and load its weights (always: that is what the folder is for).

    Args:
        name_or_cfg: zoo name, config mapping, YAML file (keys: ``segmentor.DEFAULT_CONFIG``), or a saved
            folder / Hub repository as above.
        pretrained: load the zoo checkpoint of this name.
        **overrides: config keys to replace (``num_classes=...``, ``aux=False``, ``head_kwargs={...}``), and
            ``checkpoint_path=`` (a local checkpoint, mmseg or visattn layout, .pth or .safetensors;
            loaded instead of downloading) and ``progress=`` (download progress bar).
    """
    from .. import hub

    if isinstance(name_or_cfg, str) and name_or_cfg.startswith(("local-dir:", "hf-hub:")):
        from .hf import load_segmentor

        if overrides.get("checkpoint_path") is not None:
            raise ValueError(
                f"create_segmentor({name_or_cfg!r}) loads the saved weights; checkpoint_path= is for zoo names and "
                "configs (load a checkpoint into it with visattn.engine.checkpoint.load_weights)"
            )
        overrides.pop("checkpoint_path", None)
        overrides.pop("progress", None)
        return load_segmentor(name_or_cfg, **overrides)
    checkpoint_path = overrides.pop("checkpoint_path", None)
    progress = overrides.pop("progress", True)
    cfg = resolve_config(name_or_cfg, **overrides)
    path = None
    if pretrained or checkpoint_path is not None:
        name = cfg.get("name")
        if checkpoint_path is None and (name is None or name not in hub.list_pretrained()):
            raise ValueError(
                "pretrained=True needs a zoo name (visattn.hub.list_pretrained()) or checkpoint_path=..."
            )
        # Fetch (and hash-check) before building: a failed download should not cost a model build.
        path = hub.pretrained_path(name, checkpoint_path=checkpoint_path, progress=progress)
    model = build_segmentor(cfg, init_backbone=path is None)  # a checkpoint replaces every weight
    if path is not None:
        hub.load_pretrained(model, None, checkpoint_path=path)
    else:
        # Only a zoo name promises trained weights; a config dict or YAML is a fresh model by intent.
        model.random_weights = cfg.get("name") in hub.list_pretrained()
    return model
