"""Segmentation datasets and joint transforms for training and evaluation."""

from __future__ import annotations

from typing import Any

from .datasets import ADE20K, CITYSCAPES_ID_TO_TRAIN_ID, Cityscapes, PascalVOC, cityscapes_label_to_train_id
from .synthetic import SyntheticSegmentation
from .transforms import (
    NormalizePad,
    PhotoMetricDistortion,
    RandomCropCatMax,
    RandomRatioResize,
    build_train_transform,
    build_val_transform,
)

__all__ = [
    "ADE20K",
    "CITYSCAPES_ID_TO_TRAIN_ID",
    "Cityscapes",
    "NormalizePad",
    "PascalVOC",
    "PhotoMetricDistortion",
    "RandomCropCatMax",
    "RandomRatioResize",
    "SyntheticSegmentation",
    "build_dataset",
    "build_train_transform",
    "build_val_transform",
    "cityscapes_label_to_train_id",
]

SYNTHETIC_DEFAULTS = {"train_length": 256, "val_length": 32, "size": [64, 64], "seed": 0, "max_shapes": 5}
_SPLITS = {"cityscapes": ("train", "val"), "ade20k": ("training", "validation"), "voc": ("train", "val")}


def build_dataset(data_cfg: dict[str, Any], train: bool, transform=None):
    """The dataset of a validated ``data`` config section (train or validation split), without
    augmentation unless ``transform`` is given."""
    name = data_cfg["dataset"]
    if name == "synthetic":
        syn = {**SYNTHETIC_DEFAULTS, **(data_cfg.get("synthetic") or {})}
        unknown = sorted(set(syn) - set(SYNTHETIC_DEFAULTS))
        if unknown:
            raise ValueError(
                f"unknown config key 'data.synthetic.{unknown[0]}'; valid: {sorted(SYNTHETIC_DEFAULTS)}"
            )
        return SyntheticSegmentation(
            data_cfg["num_classes"],
            syn["train_length"] if train else syn["val_length"],
            syn["size"],
            seed=syn["seed"] if train else syn["seed"] + 7919,
            max_shapes=syn["max_shapes"],
            transform=transform,
        )
    split = data_cfg["train_split" if train else "val_split"] or _SPLITS[name][0 if train else 1]
    if name == "cityscapes":
        return Cityscapes(data_cfg["root"], split, transform)
    if name == "ade20k":
        rzl = data_cfg.get("reduce_zero_label")
        return ADE20K(data_cfg["root"], split, transform, reduce_zero_label=True if rzl is None else rzl)
    if name == "voc":
        return PascalVOC(data_cfg["root"], split, transform, aug=bool(data_cfg.get("voc_aug")) and train)
    raise ValueError(f"unknown dataset {name!r}")
