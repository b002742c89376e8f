"""The base of the ViT mixer cores: the (B, h, P + H*W, d) contract and the prefix-token rule (see
:mod:`visattn.layers.mixers`)."""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MixerCore", "DenseCore", "prefix_dense", "BlockHolder"]


def prefix_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> torch.Tensor:
    """Exact softmax attention of the ``prefix`` first queries over every key: (B, h, P, d)."""
    return F.scaled_dot_product_attention(q[:, :, :prefix], k, v)


class MixerCore(nn.Module):
    """Base of the cores: ``forward(q, k, v, grid, prefix)`` on (B, h, P + H*W, d) tensors.

    Subclasses implement ``patches(q, k, v, grid, prefix)`` -> (B, h, H*W, d), the outputs of the patch
    queries; the prefix queries are dense here. ``dim`` and ``heads`` let a core size its buffers.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], prefix: int
    ) -> torch.Tensor:
        out = self.patches(q, k, v, grid, prefix)
        if prefix:
            out = torch.cat([prefix_dense(q, k, v, prefix), out], dim=2)
        return out

    def patches(self, q, k, v, grid, prefix):  # pragma: no cover - abstract
        raise NotImplementedError


class DenseCore(MixerCore):
    """Softmax attention over all tokens: timm's own attention (the reference of every other core)."""

    def forward(self, q, k, v, grid, prefix):
        return F.scaled_dot_product_attention(q, k, v)


class BlockHolder:
    """A tiny instance of a registered block (8 channels, one head) kept for its validated hyperparameters
    and its own functions (patterns, searches, budgets) and buffers (seeds, random keys). The block's
    constructor checks the hyperparameters and names itself in the error. It is held outside the module
    tree, so it adds no state-dict key; :meth:`get` moves it to the device of the call and gives it the
    train/eval mode of the core that holds it (its functions read ``self.training``)."""

    def __init__(self, name: str, **hyperparameters) -> None:
        from ...registry import create_attn

        self.block = create_attn(name, 8, heads=1, **hyperparameters)

    def get(self, device: torch.device, training: bool) -> nn.Module:
        block = self.block
        tensor = next(itertools.chain(block.buffers(), block.parameters()), None)
        if tensor is not None and tensor.device != device:
            block.to(device)
        block.train(training)
        return block
