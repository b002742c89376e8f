"""Joint image/mask transforms on torchvision.transforms.v2 (``tv_tensors.Image`` + ``tv_tensors.Mask``).

The training pipeline is mmsegmentation 1.x's, with its numerics (tests/test_mmseg_pipeline.py checks
it against mmseg's own transform classes):

1. :class:`RandomRatioResize`: mmcv's ``RandomResize(scale, ratio_range, keep_ratio=True)``: the scale
   ``(int(long * r), int(short * r))``, the image rescaled to fit in it with ``int(x * f + 0.5)`` sizes;
   the image bilinear without antialiasing (cv2's ``INTER_LINEAR``) rounded back to uint8, the mask
   nearest with cv2's ``floor(i * in / out)`` source index.
2. :class:`RandomCropCatMax`: mmseg's ``RandomCrop(crop_size, cat_max_ratio)``; a smaller image gives a
   smaller crop (``pad=False``, as in mmseg) and is padded in step 5.
3. ``RandomHorizontalFlip(0.5)``.
4. :class:`PhotoMetricDistortion`: mmseg's, on the uint8 image (each step truncates back to uint8 as
   mmseg's ``convert`` does; HSV in OpenCV's 8-bit units).
5. :class:`NormalizePad`: ``(x - mean) / std`` on the 0-255 scale, then bottom/right padding to the crop
   size with 0 (the mean colour) and the label with 255, as mmseg's ``SegDataPreProcessor`` does.

Random draws come from torch's global generator (seeded per worker by the engine), not numpy's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "NormalizePad",
    "PhotoMetricDistortion",
    "RandomCropCatMax",
    "RandomRatioResize",
    "build_train_transform",
    "build_val_transform",
    "hsv_to_rgb_cv2",
    "mmseg_rescale_size",
    "resize_bilinear_uint8",
    "resize_nearest_cv2",
    "rgb_to_hsv_cv2",
]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _image_and_mask(inputs: tuple[Any, ...]) -> tuple[Any, Any]:
    return inputs if len(inputs) == 2 else inputs[0]


def mmseg_rescale_size(h: int, w: int, scale: Sequence[int]) -> tuple[int, int]:
    """(new_h, new_w) of mmcv's ``imrescale(img, scale)``: the largest keep-ratio size inside the
    (long, short) bound ``scale``, each side ``int(side * factor + 0.5)``."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_bilinear_uint8(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A uint8 (..., H, W) image resized to ``size`` like ``cv2.resize(INTER_LINEAR)``: half-pixel
    centres, edge clamping, no antialiasing, rounded half up back to uint8.

    cv2 uses 11-bit fixed-point weights, this path float32; measured on scikit-image's photos the two
    differ by at most 1 grey level (tests/test_mmseg_pipeline.py)."""
    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image.clone()
    lead = image.shape[:-2]
    x = image.reshape(1, -1, *image.shape[-2:]).to(torch.float32)
    y = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    return torch.floor(y + 0.5).clamp_(0, 255).to(torch.uint8).reshape(*lead, *size)


def _nearest_index(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    # cv2's INTER_NEAREST: floor(i * (1 / (out / in))) in double precision, its exact expression (torch's
    # own nearest uses float32 in / out, which moves a source column where i * in / out is near an integer).
    scale = 1.0 / (n_out / n_in)
    return torch.tensor([min(math.floor(i * scale), n_in - 1) for i in range(n_out)], device=device)


def resize_nearest_cv2(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A label map (..., H, W) resized to ``size`` with ``cv2.resize(INTER_NEAREST)``'s source pixels."""
    h, w = mask.shape[-2:]
    rows = _nearest_index(h, int(size[0]), mask.device)
    cols = _nearest_index(w, int(size[1]), mask.device)
    return mask.index_select(-2, rows).index_select(-1, cols)


class RandomRatioResize(v2.Transform):
    """mmcv's ``RandomResize(scale, ratio_range, keep_ratio=True)`` with cv2's resampling: the image
    bilinear without antialiasing (:func:`resize_bilinear_uint8`), the mask nearest
    (:func:`resize_nearest_cv2`). ``scale`` is the (long, short) bound (``None``: the image's own size);
    the ratio is uniform in ``ratio_range`` and the target scale ``(int(long * r), int(short * r))``."""

    def __init__(self, scale: Sequence[int] | None, ratio_range: Sequence[float] = (0.5, 2.0)) -> None:
        super().__init__()
        self.scale = None if scale is None else (max(scale), min(scale))
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def size_for(self, h: int, w: int, ratio: float) -> tuple[int, int]:
        """The output (h, w) for an (h, w) input and the drawn ``ratio`` (mmcv's integer rules)."""
        long_edge, short_edge = self.scale if self.scale is not None else (max(h, w), min(h, w))
        target = (int(long_edge * ratio), int(short_edge * ratio))
        new_h, new_w = mmseg_rescale_size(h, w, target)
        return max(1, new_h), max(1, new_w)

    def draw(self) -> float:
        """The random ratio, uniform in ``ratio_range`` (torch's generator)."""
        lo, hi = self.ratio_range
        return lo + (hi - lo) * torch.rand((), dtype=torch.float64).item()

    def apply(self, image: torch.Tensor, mask: torch.Tensor, ratio: float) -> tuple[Any, Any]:
        """``image`` (uint8 or float, (C, H, W)) and ``mask`` resized for the given ``ratio``."""
        size = self.size_for(*mask.shape[-2:], ratio)
        if image.dtype == torch.uint8:
            resized = resize_bilinear_uint8(image, size)
        else:  # float images keep their dtype (no rounding to grey levels)
            resized = F.interpolate(
                image.reshape(1, -1, *image.shape[-2:]), size=size, mode="bilinear", align_corners=False
            ).reshape(*image.shape[:-2], *size)
        return tv_tensors.wrap(resized, like=image), tv_tensors.wrap(
            resize_nearest_cv2(mask, size), like=mask
        )

    def forward(self, *inputs: Any) -> Any:
        image, mask = _image_and_mask(inputs)
        return self.apply(image, mask, self.draw())


class RandomCropCatMax(v2.Transform):
    """mmseg's ``RandomCrop(crop_size, cat_max_ratio)``: a random crop of ``size`` (h, w); up to 10 more
    tries to find one in which no class covers ``cat_max_ratio`` or more of the labelled pixels.

    An image smaller than ``size`` gives a smaller crop with ``pad=False`` (mmseg: the padding comes after
    normalisation, :class:`NormalizePad`); ``pad=True`` pads the raw image with 0 and the mask with
    ``ignore_index`` first (the crop always has ``size``)."""

    def __init__(
        self,
        size: int | Sequence[int],
        cat_max_ratio: float = 1.0,
        ignore_index: int = 255,
        *,
        pad: bool = True,
    ) -> None:
        super().__init__()
        self.size = _pair(size)
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = int(ignore_index)
        self.pad = bool(pad)

    def forward(self, *inputs: Any) -> Any:
        image, mask = _image_and_mask(inputs)
        ch, cw = self.size
        h, w = mask.shape[-2:]
        if self.pad and (h < ch or w < cw):
            pad = [0, 0, max(cw - w, 0), max(ch - h, 0)]  # left, top, right, bottom
            image = TF.pad(image, pad, fill=0)
            mask = TF.pad(mask, pad, fill=self.ignore_index)
            h, w = mask.shape[-2:]

        def draw() -> tuple[int, int]:
            return (
                int(torch.randint(0, max(h - ch, 0) + 1, ()).item()),
                int(torch.randint(0, max(w - cw, 0) + 1, ()).item()),
            )

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
        ch, cw = min(ch, h - top), min(cw, w - left)
        return TF.crop(image, top, left, ch, cw), TF.crop(mask, top, left, ch, cw)


# OpenCV's 8-bit RGB -> HSV divides with 12-bit fixed-point reciprocal tables (color_hsv.simd.hpp);
# the same tables and shifts here give its H (0-179), S and V exactly.
_HSV_SHIFT = 12
_SDIV = torch.tensor([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], dtype=torch.int64)
_HDIV180 = torch.tensor(
    [0] + [round((180 << _HSV_SHIFT) / (6 * i)) for i in range(1, 256)], dtype=torch.int64
)


def rgb_to_hsv_cv2(image: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (3, H, W) -> uint8 HSV (3, H, W) in OpenCV's 8-bit units (H 0-179, S and V 0-255),
    bit-exact with ``cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)`` (= ``mmcv.bgr2hsv`` of the BGR image)."""
    r, g, b = image.to(torch.int64).unbind(-3)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV.to(image.device)[v] + half) >> _HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV180.to(image.device)[diff] + half) >> _HSV_SHIFT  # arithmetic shift: floor, as in C
    h = torch.where(h < 0, h + 180, h)
    return torch.stack([h, s, v], dim=-3).to(torch.uint8)


# For sector k of the hue circle, which of (v, p, q, t) are R, G and B (OpenCV's sector table, reordered).
_SECTOR_RGB = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def hsv_to_rgb_cv2(hsv: torch.Tensor) -> torch.Tensor:
    """uint8 HSV (3, H, W) in OpenCV's 8-bit units -> uint8 RGB, like ``cv2.COLOR_HSV2RGB``: OpenCV's
    vectorised path op for op (float32 sector formulas, ``1 - s * f`` fused as the x86-64 AVX2/AVX-512
    builds' FMA does, the result times 255 truncated). Bit-exact with opencv-python 5.1 on all 11.8M
    HSV triples.

    OpenCV converts row by row and its scalar path, which rounds instead of truncating, handles the last
    ``W mod 4 * lanes`` pixels of each row (64 with AVX-512, 32 with AVX2): there about a third of the
    values are 1 grey level higher in OpenCV. Crops of mmseg's sizes (512 x 512, 512 x 1024) have no
    such tail. A build without FMA differs by 1 on 0.005% of the triples."""
    h, s, v = hsv.to(torch.float32).unbind(-3)
    s = s * (1.0 / 255.0)
    v = v * (1.0 / 255.0)
    h = h * (6.0 / 180.0)
    pre_sector = torch.trunc(h)
    frac = h - pre_sector
    sector = torch.remainder(pre_sector.to(torch.int64), 6)
    one = torch.ones((), dtype=torch.float32)
    # float64 holds s * f exactly, so 1 - s * f rounds once to float32, like a fused multiply-add.
    s64 = s.to(torch.float64)
    q = (1.0 - s64 * frac.to(torch.float64)).to(torch.float32)
    t = (1.0 - s64 * (one - frac).to(torch.float64)).to(torch.float32)
    tab = torch.stack([v, v * (one - s), v * q, v * t])
    idx = _SECTOR_RGB.to(hsv.device)[sector].movedim(-1, 0)  # (3, H, W) indices into tab
    rgb = torch.gather(tab, 0, idx) * 255.0
    return rgb.clamp_(0, 255).to(torch.uint8)  # float -> uint8 truncates, as OpenCV's v_trunc


def _convert(image: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    # mmseg's convert(): float32 ``x * alpha + beta``, clipped to 0-255, truncated back to uint8.
    out = image.to(torch.float32) * alpha + beta
    return out.clamp_(0, 255).to(torch.uint8)


class PhotoMetricDistortion(v2.Transform):
    """mmseg's ``PhotoMetricDistortion`` on a uint8 RGB image (the mask passes through).

    In order: brightness (add a uniform ``delta`` in +-``brightness_delta``), then contrast when
    ``contrast_first``, saturation (HSV S times a uniform factor), hue (add an integer in
    ``[-hue_delta, hue_delta)`` to HSV H, modulo 180: OpenCV's 8-bit hue, 2 degrees per unit), then
    contrast when not ``contrast_first``. Each step happens with probability 0.5 and the contrast position
    is a fair coin; every step truncates to uint8 as mmseg does. :meth:`draw` makes the random choices
    (torch's generator), :meth:`apply` applies a given set of them.
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        super().__init__()
        if brightness_delta < 0 or hue_delta < 0 or hue_delta > 180:
            raise ValueError(
                f"PhotoMetricDistortion: brightness_delta >= 0 and 0 <= hue_delta <= 180 needed, got "
                f"{brightness_delta}, {hue_delta}"
            )
        for what, (lo, hi) in (("contrast_range", contrast_range), ("saturation_range", saturation_range)):
            if not 0 <= lo <= hi:
                raise ValueError(
                    f"PhotoMetricDistortion: {what} must be (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}"
                )
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)

    @staticmethod
    def _coin() -> bool:
        return bool(torch.randint(0, 2, ()).item())

    @staticmethod
    def _uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), dtype=torch.float64).item()

    def draw(self) -> dict[str, Any]:
        """The random choices, in mmseg's order: ``brightness``, ``contrast``, ``saturation`` (a number or
        None when the step is skipped), ``hue`` (an int or None) and ``contrast_first`` (bool)."""
        d = self.brightness_delta
        params: dict[str, Any] = {"brightness": self._uniform(-d, d) if self._coin() else None}
        params["contrast_first"] = self._coin()
        contrast = self._uniform(*self.contrast_range) if params["contrast_first"] and self._coin() else None
        params["saturation"] = self._uniform(*self.saturation_range) if self._coin() else None
        params["hue"] = (
            int(torch.randint(-self.hue_delta, self.hue_delta, ()).item())
            if self._coin() and self.hue_delta > 0
            else None
        )
        if not params["contrast_first"] and self._coin():
            contrast = self._uniform(*self.contrast_range)
        params["contrast"] = contrast
        return params

    def apply(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        """The uint8 RGB (3, H, W) image distorted with the choices ``params`` (see :meth:`draw`)."""
        if image.dtype != torch.uint8 or image.ndim < 3 or image.shape[-3] != 3:
            raise ValueError(
                f"PhotoMetricDistortion: expected a uint8 RGB image (3, H, W) (mmseg's distortion works on "
                f"grey levels), got {image.dtype} {tuple(image.shape)}; put it before the normalisation"
            )
        img = image.as_subclass(torch.Tensor)
        if params["brightness"] is not None:
            img = _convert(img, beta=params["brightness"])
        if params["contrast_first"] and params["contrast"] is not None:
            img = _convert(img, alpha=params["contrast"])
        if params["saturation"] is not None:
            hsv = rgb_to_hsv_cv2(img)
            hsv[..., 1, :, :] = _convert(hsv[..., 1, :, :], alpha=params["saturation"])
            img = hsv_to_rgb_cv2(hsv)
        if params["hue"] is not None:
            hsv = rgb_to_hsv_cv2(img)
            hsv[..., 0, :, :] = ((hsv[..., 0, :, :].to(torch.int64) + params["hue"]) % 180).to(torch.uint8)
            img = hsv_to_rgb_cv2(hsv)
        if not params["contrast_first"] and params["contrast"] is not None:
            img = _convert(img, alpha=params["contrast"])
        return img

    def forward(self, *inputs: Any) -> Any:
        image, mask = _image_and_mask(inputs)
        return tv_tensors.wrap(self.apply(image, self.draw()), like=image), mask


class NormalizePad(v2.Transform):
    """mmseg's ``SegDataPreProcessor`` for one sample: the uint8 image to float32 ``(x - mean) / std``
    (0-255 scale), then padded at the bottom and right to ``size`` (h, w) with 0 (the mean colour after
    normalisation) and the mask with ``seg_pad_val``; the mask becomes int64 (H, W). ``size=None``: no
    padding (validation)."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        size: int | Sequence[int] | None = None,
        *,
        pad_val: float = 0.0,
        seg_pad_val: int = 255,
    ) -> None:
        super().__init__()
        self.mean = list(map(float, mean))
        self.std = list(map(float, std))
        self.size = None if size is None else _pair(size)
        self.pad_val = float(pad_val)
        self.seg_pad_val = int(seg_pad_val)

    def forward(self, *inputs: Any) -> Any:
        image, mask = _image_and_mask(inputs)
        image = TF.normalize(image.to(torch.float32), self.mean, self.std)
        mask = tv_tensors.Mask(mask.reshape(mask.shape[-2:]).to(torch.int64))
        if self.size is not None:
            h, w = mask.shape[-2:]
            pad = [0, 0, max(self.size[1] - w, 0), max(self.size[0] - h, 0)]  # left, top, right, bottom
            if pad[2] or pad[3]:
                image = TF.pad(image, pad, fill=self.pad_val)
                mask = TF.pad(mask, pad, fill=self.seg_pad_val)
        return image, mask


def build_train_transform(
    data_cfg: dict[str, Any], mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    """mmseg's training pipeline for a ``data`` config section (see the module docstring)."""
    steps: list[Any] = [RandomRatioResize(data_cfg.get("scale"), data_cfg.get("ratio_range", (0.5, 2.0)))]
    steps.append(RandomCropCatMax(data_cfg["crop_size"], data_cfg.get("cat_max_ratio", 1.0), pad=False))
    if data_cfg.get("flip", True):
        steps.append(v2.RandomHorizontalFlip(0.5))
    if data_cfg.get("photometric", True):
        steps.append(PhotoMetricDistortion())
    steps.append(NormalizePad(mean, std, data_cfg["crop_size"]))
    return v2.Compose(steps)


def build_val_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Validation: normalisation only (the segmentor resizes to its test scale)."""
    return v2.Compose([NormalizePad(mean, std)])
