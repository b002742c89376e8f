"""When a block's hand-written backward (a ``torch.autograd.Function`` that fuses its gradient passes)
replaces plain autograd: one rule for every block that has one (gcnet, cbam)."""

from __future__ import annotations

import torch

__all__ = ["use_fused_backward"]


def use_fused_backward(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the hand-written backward applies: eager autograd without autocast.

    Compiled and exported graphs fuse the plain ops themselves, and under autocast the plain ops pick
    their own dtypes; both keep the reference path (the one the equivalence tests compare against).
    """
    return (
        torch.is_grad_enabled()
        and (x.requires_grad or weight.requires_grad)
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled(x.device.type)
    )
