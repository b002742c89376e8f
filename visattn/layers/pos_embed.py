"""2D positional encodings that work at any resolution."""

from __future__ import annotations

import torch
import torch.nn as nn

from .block import check_odd_kernel, factory_kwargs
from .precision import accuracy_dtype

__all__ = ["sincos_2d", "ConvPosEnc"]


def sincos_2d(
    height: int, width: int, dim: int, *, temperature: float = 10000.0, device=None, dtype=None
) -> torch.Tensor:
    """Fixed 2D sine-cosine encoding (MAE / ViT-style), shape (H*W, dim) in raster order.

    A quarter of the channels encodes each of sin(y), cos(y), sin(x), cos(x); channels left over
    when ``dim`` is not a multiple of 4 are zero. Computed in ``accuracy_dtype(dtype)`` (float32 for
    half types and ``dtype=None``, float64 for float64), then cast to ``dtype``.
    """
    quarter = dim // 4
    # Half types cannot hold the positions or the sine arguments; a float64 model must get the float64
    # encoding, not float32 values widened.
    acc = torch.float32 if dtype is None else accuracy_dtype(dtype)
    out = torch.zeros(height * width, dim, device=device, dtype=acc)
    if quarter > 0:
        omega = 1.0 / temperature ** (torch.arange(quarter, device=device, dtype=acc) / quarter)
        ys, xs = torch.meshgrid(
            torch.arange(height, device=device, dtype=acc),
            torch.arange(width, device=device, dtype=acc),
            indexing="ij",
        )
        y = ys.reshape(-1, 1) * omega
        x = xs.reshape(-1, 1) * omega
        out[:, : 4 * quarter] = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)
    return out.to(dtype) if dtype is not None else out


class ConvPosEnc(nn.Module):
    """Conditional positional encoding (CPVT's PEG): ``x + depthwise_conv(x)``.

    Works at any H, W because it is a convolution; ``causal=True`` uses a kernel that only looks at
    rows above and pixels to the left in the current row (raster order), so it never leaks the future.
    """

    def __init__(self, channels: int, kernel_size: int = 3, *, causal: bool = False, device=None, dtype=None):
        super().__init__()
        check_odd_kernel(kernel_size, "ConvPosEnc")
        self.causal = causal
        self.proj = nn.Conv2d(
            channels,
            channels,
            kernel_size,
            padding=kernel_size // 2,
            groups=channels,
            **factory_kwargs(device, dtype),
        )
        if causal:
            k = kernel_size
            mask = torch.zeros(k, k)
            mask[: k // 2] = 1.0
            mask[k // 2, : k // 2 + 1] = 1.0
            self.register_buffer("mask", mask.to(device=device), persistent=False)
        else:
            self.mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight if self.mask is None else self.proj.weight * self.mask.to(self.proj.weight)
        return x + nn.functional.conv2d(
            x, weight, self.proj.bias, padding=self.proj.padding, groups=self.proj.groups
        )
