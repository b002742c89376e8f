"""Joint image/mask transforms on torchvision.transforms.v2 (``tv_tensors.Image`` + ``tv_tensors.Mask``).

The geometric transforms (resize, crop, pad, flip) act on the image and the mask together (the mask
resized with nearest neighbours, padded with the ignore index); photometric ones touch the image only.
They follow mmseg's training pipeline: RandomResize(ratio 0.5-2.0, keep ratio), RandomCrop with
``cat_max_ratio``, RandomFlip, PhotoMetricDistortion; normalisation on the 0-255 scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = ["RandomCropCatMax", "RandomRatioResize", "build_train_transform", "build_val_transform"]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class RandomRatioResize(v2.Transform):
    """mmseg's ``RandomResize(scale, ratio_range, keep_ratio=True)``: the (long, short) bound ``scale``
    times a uniform ratio, the image rescaled to fit in it (``scale=None``: the image's own size)."""

    def __init__(self, scale: Sequence[int] | None, ratio_range: Sequence[float] = (0.5, 2.0)) -> None:
        super().__init__()
        self.scale = None if scale is None else (max(scale), min(scale))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        lo, hi = self.ratio_range
        ratio = lo + (hi - lo) * torch.rand(()).item()
        long_edge, short_edge = self.scale if self.scale is not None else (max(h, w), min(h, w))
        factor = min(long_edge * ratio / max(h, w), short_edge * ratio / min(h, w))
        return {"size": [max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return TF.resize(inpt, params["size"], antialias=True)  # Mask: nearest, by dispatch


class RandomCropCatMax(v2.Transform):
    """Random crop (padding first when the image is smaller: image 0, mask ``ignore_index``); up to 10
    tries to find a crop in which no class covers more than ``cat_max_ratio`` of the labelled pixels."""

    def __init__(
        self, size: int | Sequence[int], cat_max_ratio: float = 1.0, ignore_index: int = 255
    ) -> None:
        super().__init__()
        self.size = _pair(size)
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)

    def forward(self, *inputs: Any) -> Any:
        image, mask = inputs if len(inputs) == 2 else inputs[0]
        ch, cw = self.size
        h, w = mask.shape[-2:]
        if h < ch or w < cw:
            pad = [0, 0, max(cw - w, 0), max(ch - h, 0)]  # left, top, right, bottom
            image = TF.pad(image, pad, fill=0)
            mask = TF.pad(mask, pad, fill=self.ignore_index)
            h, w = mask.shape[-2:]

        def draw() -> tuple[int, int]:
            return int(torch.randint(0, h - ch + 1, ()).item()), int(torch.randint(0, w - cw + 1, ()).item())

        top, left = draw()
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                crop = mask[..., top : top + ch, left : left + cw]
                labels = crop[crop != self.ignore_index]
                counts = torch.bincount(labels.flatten().long()) if labels.numel() else torch.zeros(0)
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                    break
                top, left = draw()
        return TF.crop(image, top, left, ch, cw), TF.crop(mask, top, left, ch, cw)


class _ToFloatNormalize(v2.Transform):
    """uint8 image -> float32 normalised with mean/std on the 0-255 scale; the mask -> int64 (H, W)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean = list(map(float, mean))
        self.std = list(map(float, std))

    def forward(self, *inputs: Any) -> Any:
        image, mask = inputs if len(inputs) == 2 else inputs[0]
        image = TF.normalize(image.to(torch.float32), self.mean, self.std)
        return image, tv_tensors.Mask(mask.reshape(mask.shape[-2:]).to(torch.int64))


def build_train_transform(
    data_cfg: dict[str, Any], mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    steps: list[Any] = [RandomRatioResize(data_cfg.get("scale"), data_cfg.get("ratio_range", (0.5, 2.0)))]
    steps.append(RandomCropCatMax(data_cfg["crop_size"], data_cfg.get("cat_max_ratio", 1.0)))
    if data_cfg.get("flip", True):
        steps.append(v2.RandomHorizontalFlip(0.5))
    if data_cfg.get("photometric", True):
        # mmseg's PhotoMetricDistortion ranges: brightness +-32, contrast/saturation 0.5-1.5, hue +-18 deg.
        steps.append(
            v2.ColorJitter(
                brightness=(1 - 32 / 128, 1 + 32 / 128),
                contrast=(0.5, 1.5),
                saturation=(0.5, 1.5),
                hue=18 / 360,
            )
        )
    steps.append(_ToFloatNormalize(mean, std))
    return v2.Compose(steps)


def build_val_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose([_ToFloatNormalize(mean, std)])
