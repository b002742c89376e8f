"""A synthetic segmentation dataset generated on the fly: textured shapes that occlude each other.

Each class has its own texture (a base colour and a stripe pattern of class-specific orientation and
frequency); class 0 is the background. Every image draws a few rectangles, ellipses and triangles of
random classes, later shapes covering earlier ones, plus noise. Sample ``i`` is a pure function of
``(seed, i)`` (its own ``torch.Generator``), so it is identical in any process and after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision import tv_tensors

__all__ = ["SyntheticSegmentation"]


class SyntheticSegmentation(torch.utils.data.Dataset):
    """Args:
    num_classes: classes including the background 0.
    length: number of samples.
    size: (h, w) of the images.
    seed: dataset seed (use a different one for the validation split).
    max_shapes: shapes per image (1..max_shapes).
    transform: joint transform called as ``transform(image, mask)``.
    """

    def __init__(
        self,
        num_classes: int = 6,
        length: int = 256,
        size: int | Sequence[int] = 64,
        *,
        seed: int = 0,
        max_shapes: int = 5,
        noise: float = 12.0,
        transform: Callable | None = None,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"SyntheticSegmentation: num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.length = int(length)
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self.max_shapes = int(max_shapes)
        self.noise = float(noise)
        self.transform = transform
        # Class textures: fixed for the dataset family (independent of the split seed).
        g = torch.Generator().manual_seed(12345)
        self.colours = torch.rand(self.num_classes, 3, generator=g) * 160 + 48
        self.angles = torch.rand(self.num_classes, generator=g) * math.pi
        self.freqs = 0.25 + torch.rand(self.num_classes, generator=g) * 0.8
        self.contrast = 20 + torch.rand(self.num_classes, generator=g) * 40

    def __len__(self) -> int:
        return self.length

    def generate(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 image (3, H, W), int64 mask (H, W)) of sample ``index``, without the transform."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        h, w = self.size
        yy, xx = torch.meshgrid(
            torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
        )
        mask = torch.zeros(h, w, dtype=torch.int64)
        n = int(torch.randint(1, self.max_shapes + 1, (), generator=g))
        for _ in range(n):  # a few shapes per image: the loop is over shapes, not pixels
            cls = int(torch.randint(1, self.num_classes, (), generator=g))
            kind = int(torch.randint(0, 3, (), generator=g))
            cy, cx = (torch.rand(2, generator=g) * torch.tensor([h, w])).tolist()
            ry, rx = ((0.12 + 0.3 * torch.rand(2, generator=g)) * torch.tensor([h, w])).tolist()
            if kind == 0:
                inside = ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx)
            elif kind == 1:
                inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:  # triangle pointing up
                inside = (yy <= cy + ry) & ((xx - cx).abs() <= (yy - (cy - ry)) * rx / (2 * ry))
            mask[inside] = cls
        angle, freq = self.angles[mask], self.freqs[mask]
        phase = torch.rand((), generator=g) * 2 * math.pi
        stripes = torch.sin(freq * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)
        shade = 0.85 + 0.3 * torch.rand(3, 1, 1, generator=g)  # per-image illumination
        image = self.colours[mask].permute(2, 0, 1) * shade + self.contrast[mask] * stripes
        image = image + self.noise * torch.randn(3, h, w, generator=g)
        return image.clamp(0, 255).to(torch.uint8), mask

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, mask = self.generate(index)
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask
