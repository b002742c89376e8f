"""Cityscapes, ADE20K and Pascal VOC 2012 for their published folder layouts.

Every dataset returns ``(tv_tensors.Image uint8 (3, H, W), tv_tensors.Mask int64 (H, W))`` with the
ignore label 255, passed through ``transform(image, mask)`` when given.

* Cityscapes: ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png``; where only ``*_gtFine_labelIds.png`` exist
  the 34 label ids are mapped to the 19 train ids on the fly (:func:`cityscapes_label_to_train_id`).
* ADE20K: ``ADEChallengeData2016/{images,annotations}/{training,validation}/*.{jpg,png}``;
  ``reduce_zero_label``: label 0 ("other") becomes 255 and 1..150 become 0..149.
* Pascal VOC 2012: ``VOC2012/JPEGImages/*.jpg``, ``SegmentationClass/*.png`` (palette PNGs, the index is
  the class, 255 the border) and ``ImageSets/Segmentation/<split>.txt``; with ``aug=True`` the SBD
  ``SegmentationClassAug`` masks and ``ImageSets/Segmentation/aug.txt`` (mmseg's layout).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

__all__ = ["ADE20K", "CITYSCAPES_ID_TO_TRAIN_ID", "Cityscapes", "PascalVOC", "cityscapes_label_to_train_id"]

# Cityscapes labelIds (0..33, -1 license plate) -> trainIds (0..18), others 255 (cityscapesScripts labels.py).
CITYSCAPES_ID_TO_TRAIN_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
_LUT = torch.full((256,), 255, dtype=torch.int64)
for _k, _v in CITYSCAPES_ID_TO_TRAIN_ID.items():
    _LUT[_k] = _v


def cityscapes_label_to_train_id(label_ids: torch.Tensor) -> torch.Tensor:
    """Map a Cityscapes ``labelIds`` map (values 0..33) to the 19 train ids, everything else to 255."""
    return _LUT[label_ids.long().clamp(0, 255)]


def _read_image(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _read_mask(path: Path) -> torch.Tensor:
    with Image.open(path) as im:  # palette PNGs keep their indices (no convert)
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., 0]
    return torch.from_numpy(arr.astype(np.int64))


class _SegFolder(torch.utils.data.Dataset):
    num_classes = 0

    def __init__(self, pairs: list[tuple[Path, Path]], transform: Callable | None) -> None:
        if not pairs:
            raise FileNotFoundError(f"{type(self).__name__}: no image/label pairs found")
        self.pairs = pairs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def load_mask(self, path: Path) -> torch.Tensor:
        return _read_mask(path)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img_path, mask_path = self.pairs[index]
        image = tv_tensors.Image(_read_image(img_path))
        mask = tv_tensors.Mask(self.load_mask(mask_path))
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder {str(path)!r} does not exist")
    return path


class Cityscapes(_SegFolder):
    """Cityscapes fine annotations, 19 train ids. Args: root (holds leftImg8bit/ and gtFine/),
    split ('train' / 'val' / 'test'), transform."""

    num_classes = 19

    def __init__(
        self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None
    ) -> None:
        root = Path(root)
        img_dir = _need_dir(root / "leftImg8bit" / split, "Cityscapes")
        ann_dir = _need_dir(root / "gtFine" / split, "Cityscapes")
        pairs = []
        for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
            stem = img.name[: -len("_leftImg8bit.png")]
            train_ids = ann_dir / img.parent.name / f"{stem}_gtFine_labelTrainIds.png"
            label_ids = ann_dir / img.parent.name / f"{stem}_gtFine_labelIds.png"
            if train_ids.is_file():
                pairs.append((img, train_ids))
            elif label_ids.is_file():
                pairs.append((img, label_ids))
            else:
                raise FileNotFoundError(f"Cityscapes: no label for {img} (expected {train_ids})")
        super().__init__(pairs, transform)

    def load_mask(self, path: Path) -> torch.Tensor:
        mask = _read_mask(path)
        return mask if path.name.endswith("_labelTrainIds.png") else cityscapes_label_to_train_id(mask)


class ADE20K(_SegFolder):
    """ADE20K SceneParsing (ADEChallengeData2016), 150 classes. Args: root (the ADEChallengeData2016
    folder), split ('training' / 'validation', or 'train' / 'val'), reduce_zero_label (default True)."""

    num_classes = 150

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "training",
        transform: Callable | None = None,
        *,
        reduce_zero_label: bool = True,
    ) -> None:
        split = {"train": "training", "val": "validation"}.get(split, split)
        root = Path(root)
        img_dir = _need_dir(root / "images" / split, "ADE20K")
        ann_dir = _need_dir(root / "annotations" / split, "ADE20K")
        pairs = [(img, ann_dir / f"{img.stem}.png") for img in sorted(img_dir.glob("*.jpg"))]
        missing = [str(m) for _, m in pairs if not m.is_file()]
        if missing:
            raise FileNotFoundError(f"ADE20K: missing annotation {missing[0]}")
        self.reduce_zero_label = reduce_zero_label
        super().__init__(pairs, transform)

    def load_mask(self, path: Path) -> torch.Tensor:
        mask = _read_mask(path)
        if self.reduce_zero_label:  # mmseg's LoadAnnotations(reduce_zero_label=True)
            mask = torch.where(mask == 0, 255, mask - 1)
            mask[mask == 254] = 255
        return mask


class PascalVOC(_SegFolder):
    """Pascal VOC 2012 segmentation, 21 classes. Args: root (the VOC2012 folder), split ('train', 'val',
    'trainval', or 'aug' for SBD's 10582 with SegmentationClassAug), transform."""

    num_classes = 21

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Callable | None = None,
        *,
        aug: bool = False,
    ) -> None:
        root = Path(root)
        ann = "SegmentationClassAug" if aug or split == "aug" else "SegmentationClass"
        split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"PascalVOC: split file {str(split_file)!r} does not exist")
        names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        img_dir, ann_dir = _need_dir(root / "JPEGImages", "PascalVOC"), _need_dir(root / ann, "PascalVOC")
        pairs = [(img_dir / f"{n}.jpg", ann_dir / f"{n}.png") for n in names]
        missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"PascalVOC: missing file {missing[0]}")
        super().__init__(pairs, transform)
