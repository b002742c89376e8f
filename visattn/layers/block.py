"""The base class of every block: input validation once, in one place."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["AttnBlock", "check_feature_map", "check_odd_kernel", "factory_kwargs"]


def factory_kwargs(device: Any = None, dtype: Any = None) -> dict[str, Any]:
    """``dict(device=..., dtype=...)`` for layer constructors (timm's ``dd`` convention)."""
    return {"device": device, "dtype": dtype}


def check_odd_kernel(kernel_size: int, owner: str, name: str = "kernel_size") -> None:
    """ValueError ``"<owner>: <name> must be odd and >= 1"`` unless it is (a centred window needs it)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{owner}: {name} must be odd and >= 1, got {kernel_size}")


def check_feature_map(x: torch.Tensor, channels: int, block: str) -> None:
    """Raise ValueError naming ``block``, the expected and the received shape unless ``x`` is a
    floating-point (B, channels, H, W) tensor with H, W >= 1."""
    ok = (
        isinstance(x, torch.Tensor)
        and x.dim() == 4
        and x.shape[1] == channels
        and x.shape[0] >= 1
        and x.shape[2] >= 1
        and x.shape[3] >= 1
        and x.is_floating_point()
    )
    if not ok:
        if not isinstance(x, torch.Tensor):
            got = f"a {type(x).__name__}"
        else:
            got = f"a {str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)}"
        raise ValueError(
            f"{block}: expected a floating-point feature map of shape (B, {channels}, H, W) with B, H, W >= 1, "
            f"got {got}. Pass NCHW input (e.g. x.permute(0, 3, 1, 2) for NHWC) with {channels} channels, "
            "as a float tensor (x.float())."
        )


class AttnBlock(nn.Module):
    """Base of every registered block: ``forward`` validates the input and calls ``_forward``.

    Subclasses implement ``_forward(x: (B, C, H, W)) -> (B, C, H, W)``.
    """

    attn_name: str = ""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"{self._block_name()}: channels must be a positive int, got {channels!r}")
        self.channels = channels

    def _block_name(self) -> str:
        return type(self).attn_name or type(self).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, self.channels, self._block_name())
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
