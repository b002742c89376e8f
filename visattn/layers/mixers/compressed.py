"""Mixer cores that compress the patch keys and values along the token axis before one softmax: Kronecker
attention (KAO_KV: the H row means and W column means of the k/v grid), Linformer (learned E, F length
projections on a reference grid resampled to the patch grid) and memory-compressed attention (a strided
convolution over the k/v grid). Every patch query attends the prefix keys, uncompressed, and the compressed
patch keys in one softmax; the prefix queries are dense (:class:`~.base.MixerCore`)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..padding import ceil_div
from .base import BlockHolder, MixerCore

__all__ = ["KroneckerCore", "LinformerCore", "MemoryCompressedCore"]


def attend_compressed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: int,
    k_patch: torch.Tensor,
    v_patch: torch.Tensor,
) -> torch.Tensor:
    """The patch queries of ``q`` (B, h, P + N, d) over the prefix keys of ``k``/``v`` and the compressed
    patch keys ``k_patch``/``v_patch`` (B, h, M, d): one softmax over P + M keys, (B, h, N, d)."""
    keys = torch.cat([k[:, :, :prefix], k_patch], dim=2)
    values = torch.cat([v[:, :, :prefix], v_patch], dim=2)
    return F.scaled_dot_product_attention(q[:, :, prefix:], keys, values)


class KroneckerCore(MixerCore):
    """Kronecker attention, KAO_KV: every patch query attends the H row means and W column means of the
    patch k/v grid (the CNN block's :meth:`~visattn.attn.kronecker.KroneckerAttention.average_tokens`) plus
    the prefix keys, O(N·(H + W)). No new parameters and no dense limit (H + W pooled keys are not the
    N patch keys for any grid larger than 1 x 1).

    The paper's other operator, KAO_QKV (the block's default), is refused: its queries are pooled too and a
    patch's output is the sum of a row output and a column output, so the pretrained per-patch queries
    would be discarded and the output is not a softmax average of the values.
    """

    def __init__(self, dim: int, heads: int, *, variant: str = "kv") -> None:
        super().__init__(dim, heads)
        if variant != "kv":
            raise ValueError(
                f"kronecker (ViT mixer): variant={variant!r} is not available; use variant='kv' (KAO_KV: every "
                "patch query attends the row and column means). KAO_QKV pools the queries too and sums a row "
                "and a column output, which discards the pretrained per-patch queries"
            )
        self.variant = variant

    def patches(self, q, k, v, grid, prefix):
        from ...attn.kronecker import KroneckerAttention

        height, _ = grid

        def pooled(t: torch.Tensor) -> torch.Tensor:
            maps = rearrange(t[:, :, prefix:], "b h (y x) d -> (b h) d y x", y=height)
            tokens = KroneckerAttention.average_tokens(maps)  # (B·h, H + W, d): row means, then column means
            return rearrange(tokens, "(b h) n d -> b h n d", b=t.shape[0])

        return attend_compressed(q, k, v, prefix, pooled(k), pooled(v))


class LinformerCore(MixerCore):
    """Linformer: the patch keys and values are projected along the token axis to ``k`` rows by learned E, F
    (new parameters ``e`` and ``f``, shape (n_proj, k, h_ref·w_ref), entries N(0, 1/k) as the paper's
    Johnson–Lindenstrauss projection). As in the CNN block (:meth:`visattn.attn.linformer.Linformer.projection`)
    E and F live on a reference grid ``ref_size`` and are resampled to the patch grid, scaled by n_ref / N,
    so any input size works; set ``ref_size`` to the model's pretrained patch grid (14 for 224 px with
    16 px patches). The prefix keys join unprojected. ``sharing``: ``"headwise"`` (one E and one F),
    ``"none"`` (per head), ``"key_value"`` (F = E, no ``f``).

    No dense limit by hyperparameters (E, F are learned): with ``k = H·W``, ``ref_size = (H, W)`` and
    E = F = identity it is exactly dense attention.
    """

    def __init__(self, dim: int, heads: int, *, k: int = 64, sharing: str = "headwise",
                 ref_size: int | tuple[int, int] = 14) -> None:  # fmt: skip
        super().__init__(dim, heads)
        # The block checks k, sharing and ref_size (naming itself) and owns the reference-grid resampling.
        self.holder = BlockHolder("linformer", k=k, sharing=sharing, ref_size=ref_size)
        self.k, self.sharing = k, sharing
        self.ref_hw = self.holder.block.ref_hw
        n_proj = heads if sharing == "none" else 1
        shape = (n_proj, k, self.ref_hw[0] * self.ref_hw[1])
        self.e = nn.Parameter(torch.empty(shape))
        self.register_parameter("f", None if sharing == "key_value" else nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's projections: i.i.d. N(0, 1/k) entries (Johnson–Lindenstrauss)."""
        for p in (self.e, self.f):
            if p is not None:
                nn.init.normal_(p, std=self.k**-0.5)

    def extra_repr(self) -> str:
        return f"k={self.k}, sharing={self.sharing!r}, ref_size={self.ref_hw}"

    def patches(self, q, k, v, grid, prefix):
        # projection() only reads the block's reference grid; the weights are this core's.
        project = self.holder.block.projection
        e = project(self.e, *grid)  # (n_proj, k, N); n_proj = 1 broadcasts over the heads
        f = e if self.f is None else project(self.f, *grid)
        k_patch = e.unsqueeze(0) @ k[:, :, prefix:]
        v_patch = f.unsqueeze(0) @ v[:, :, prefix:]
        return attend_compressed(q, k, v, prefix, k_patch, v_patch)


class MemoryCompressedCore(MixerCore):
    """Memory-compressed attention: the patch k/v grid is compressed by a strided convolution (kernel =
    stride = ``compression``, the paper's 1-D kernel-3 stride-3 convolution made 2-D as in the CNN block,
    zero-padded at the bottom/right to multiples of it) and every patch query attends the compressed keys
    plus the prefix keys. New parameters ``kv.weight``/``kv.bias``: one grouped convolution over the keys
    and the values, one group per head of each (a head's compressed keys are made of that head's keys, so
    the pretrained heads stay separate; a full convolution would add dim² · s² weights per layer).

    Initialisation: the paper gives none for the convolution, and a random one would replace the pretrained
    keys by random mixtures; :meth:`reset_parameters` makes it the per-channel cell mean (1/s² on each
    channel's own taps, zero bias), so a pretrained layer starts as attention over pooled keys and values.
    Dense limit: ``compression=1`` at that initialisation (the convolution is the identity).
    """

    def __init__(self, dim: int, heads: int, *, compression: int = 3) -> None:
        super().__init__(dim, heads)
        # Validation only: the block checks compression and names itself; the convolution here is new.
        BlockHolder("memory_compressed", compression=compression, pos_enc=False)
        self.compression = compression
        self.kv = nn.Conv2d(2 * dim, 2 * dim, compression, stride=compression, groups=2 * heads)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Cell mean: each output channel averages its own input channel over the s x s cell."""
        s, d = self.compression, self.head_dim
        with torch.no_grad():
            weight = self.kv.weight  # (2·dim, d, s, s): output channel c of a group reads its channel c % d
            weight.zero_()
            channel = torch.arange(weight.shape[0], device=weight.device)
            weight[channel, channel % d] = 1.0 / (s * s)
            self.kv.bias.zero_()

    def extra_repr(self) -> str:
        return f"compression={self.compression}"

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        s = self.compression
        kv = torch.cat([k[:, :, prefix:], v[:, :, prefix:]], dim=1)  # (B, 2h, N, d): the keys' heads first
        maps = rearrange(kv, "b g (y x) d -> b (g d) y x", y=height)
        maps = F.pad(maps, (0, ceil_div(width, s) * s - width, 0, ceil_div(height, s) * s - height))
        cells = rearrange(self.kv(maps), "b (g d) y x -> b g (y x) d", d=self.head_dim)
        k_patch, v_patch = cells.chunk(2, dim=1)
        return attend_compressed(q, k, v, prefix, k_patch, v_patch)
