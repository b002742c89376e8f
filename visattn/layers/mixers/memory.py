"""Memory mixer cores (Compressive Transformer, Memformer): the patch grid's row-bands are the papers'
segments, and each band's patch queries read memories of the bands above it.

Both CNN blocks (:mod:`visattn.attn.compressive`, :mod:`visattn.attn.memformer`) cut the map into bands of
``band_rows`` rows in raster order; here the bands are patch rows and every key and value is the pretrained
one. The prefix tokens follow the rule of :mod:`visattn.layers.mixers`: their queries attend everything
densely, and their keys join every band's softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ...attn.compressive import band_windows, compress_rows
from ...attn.memformer import biased_normalize, slot_write_mask
from .base import BlockHolder, MixerCore

__all__ = ["CompressiveCore", "MemformerCore"]


def _with_prefix(keys: torch.Tensor, prefix_keys: torch.Tensor, bands: int) -> torch.Tensor:
    """Prepend the (B, h, P, d) prefix keys/values to each band's (B·bands, h, L, d) window."""
    shared = prefix_keys.unsqueeze(1).expand(-1, bands, -1, -1, -1).flatten(0, 1)
    return torch.cat([shared, keys], dim=2)


class CompressiveCore(MixerCore):
    """Band t's patch queries attend, in one softmax, to the prefix keys, the compressed memory (rows
    ``[T - m - cm, T - m)`` compressed along the row by rate c), the memory (the pretrained keys/values of
    rows ``[T - m, T)``) and the band's own rows (T = the band's top row), as the CNN block's batched bands
    (:func:`visattn.attn.compressive.band_windows` cuts the windows for both).

    The block compresses its *input* rows and projects them; a mixer only has the projected keys and values,
    so the compression is a strided ``(1, c)`` convolution on the keys and one on the values (one grouped
    conv, ``core.compress``, over all heads' channels): since the projections are linear, any conv on the
    inputs followed by the pretrained projections is such a pair of convs (for invertible projections), so
    this is the paper's compression network seen after the projections. The paper does not state its
    conv's initialisation; ``reset_parameters`` starts it as the paper's mean-pooling compression (each tap
    ``I / c``, bias 0), so the pretrained ViT first reads mean-pooled keys/values of the evicted rows.
    The attention-reconstruction loss of the block is not computed here (the task loss trains the conv).

    Dense limit: ``band_rows >= H`` (one band, no memory): exactly dense attention.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        band_rows: int = 2,
        mem_rows: int | None = None,
        cmem_rows: int | None = None,
        compression: int = 3,
    ) -> None:
        super().__init__(dim, heads)
        # The block validates the hyperparameters (errors name "compressive") and resolves the defaults.
        block = BlockHolder(
            "compressive",
            band_rows=band_rows,
            mem_rows=mem_rows,
            cmem_rows=cmem_rows,
            compression=compression,
        ).block
        self.band_rows, self.mem_rows, self.cmem_rows = block.band_rows, block.mem_rows, block.cmem_rows
        self.compression = block.compression
        c = self.compression
        # Keys (first dim channels) and values (last dim channels) compressed by separate filters.
        self.compress = nn.Conv2d(2 * dim, 2 * dim, (1, c), stride=(1, c), groups=2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mean pooling over each run of c tokens: the paper's simplest compression function."""
        dim, c = self.dim, self.compression
        with torch.no_grad():
            eye = torch.eye(dim, dtype=self.compress.weight.dtype, device=self.compress.weight.device)
            self.compress.weight.copy_((eye / c)[:, :, None, None].repeat(2, 1, 1, c))
            self.compress.bias.zero_()

    def extra_repr(self) -> str:
        return (
            f"band_rows={self.band_rows}, mem_rows={self.mem_rows}, cmem_rows={self.cmem_rows}, "
            f"compression={self.compression}"
        )

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        bsz, heads = q.shape[:2]
        b, m, cm = self.band_rows, self.mem_rows, self.cmem_rows
        nb = -(-height // b)
        h_pad = nb * b
        rows = rearrange(
            torch.cat([k[:, :, prefix:], v[:, :, prefix:]], dim=1), "b hh (y x) d -> b y x (hh d)", y=height
        )
        # m empty rows on top (the first bands' memory) and the last band padded to b rows.
        kv = F.pad(rows, (0, 0, 0, 0, m, h_pad - height))
        n_comp = (nb - 1) * b - m if cm else 0
        ckv = None
        if n_comp > 0:
            comp = compress_rows(
                self.compress, rearrange(rows[:, :n_comp], "b y x c -> b c y x"), self.compression
            )
            ckv = F.pad(rearrange(comp, "b c y x -> b y x c"), (0, 0, 0, 0, m + cm, 0))
        windows, key_ok = band_windows(kv, ckv, height, b, m, cm)
        k_w, v_w = rearrange(windows, "b t l (two h d) -> two (b t) h l d", two=2, h=heads)
        if prefix:
            k_w = _with_prefix(k_w, k[:, :, :prefix], nb)
            v_w = _with_prefix(v_w, v[:, :, :prefix], nb)
            key_ok = torch.cat([key_ok.new_ones(nb, prefix), key_ok], dim=1)
        q_b = F.pad(q[:, :, prefix:], (0, 0, 0, (h_pad - height) * width))
        q_b = rearrange(q_b, "b h (t n) d -> (b t) h n d", t=nb)
        mask = key_ok[None, :, None, None, :].expand(bsz, -1, -1, -1, -1).flatten(0, 1)
        out = F.scaled_dot_product_attention(q_b, k_w, v_w, attn_mask=mask)
        return rearrange(out, "(b t) h n d -> b h (t n) d", b=bsz)[:, :, : height * width]


class MemformerCore(MixerCore):
    """Row-band recurrence through ``num_slots`` memory slots per head, read and written as the CNN block's.

    A slot is a (key, value) pair in the head's pretrained key and value spaces (the block's slots are read
    through the same projections as the pixels, so the mixer stores them projected). Read: band t's patch
    queries attend, in one softmax, to the prefix keys, the slots and the band's own keys. Write (the paper's
    slot attention): slot i attends only to itself and to the band's tokens, with the query ``κ_i W_h``
    (``core.write_query``, the paper's slot-query projection, here from key to query space), the keys
    ``[κ_i; k_band]`` and the values ``[(κ_i, ν_i); (k, v)_band]``, at temperature τ; then biased memory
    normalization (forgetting) of the key and the value parts, ``√d·(m + b_i) / ||m + b_i||``, with
    ``core.forget_bias`` b (heads, slots, 2, d). The initial memory is the terminal state ``√d·b_i/||b_i||``.
    Unlike the block, the write reads the band's pretrained keys/values rather than its outputs: the mixer
    has no projection of its outputs into key space. ``reset_parameters``: b standard normal (the block's
    ``forget_bias``), ``W_h`` as a Linear layer's default (the block's ``write_q``; the paper states no
    special initialisation). The loop over bands is sequential (band t reads what band t-1 wrote).

    No dense limit: even one band covering the grid reads the initial slots.
    """

    def __init__(
        self, dim: int, heads: int, *, num_slots: int = 64, band_rows: int = 2, write_temperature: float = 0.5
    ) -> None:
        super().__init__(dim, heads)
        BlockHolder(
            "memformer", num_slots=num_slots, band_rows=band_rows, write_temperature=write_temperature
        )  # validates the hyperparameters; errors name "memformer"
        self.num_slots, self.band_rows = num_slots, band_rows
        self.write_temperature = float(write_temperature)
        d = self.head_dim
        self.forget_bias = nn.Parameter(torch.empty(heads, num_slots, 2, d))
        self.write_query = nn.Parameter(torch.empty(heads, d, d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The block's initialisation: standard normal forgetting bias, Linear-default write query."""
        with torch.no_grad():
            self.forget_bias.normal_()
            bound = 1.0 / math.sqrt(self.head_dim)
            self.write_query.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return (
            f"num_slots={self.num_slots}, band_rows={self.band_rows}, "
            f"write_temperature={self.write_temperature}"
        )

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        bsz, heads, _, d = q.shape
        slots, n_max = self.num_slots, self.band_rows * width
        norm = math.sqrt(d)
        bias = self.forget_bias.to(q.dtype)
        memory = biased_normalize(torch.zeros_like(bias), bias, norm).expand(bsz, -1, -1, -1, -1)
        write_mask = slot_write_mask(slots, n_max, q.device)
        write_scale = 1.0 / (self.write_temperature * math.sqrt(d))
        write_query = self.write_query.to(q.dtype)
        pk, pv = k[:, :, :prefix], v[:, :, :prefix]
        bands = [t.split(n_max, dim=2) for t in (q[:, :, prefix:], k[:, :, prefix:], v[:, :, prefix:])]
        outs = []
        for t, (q_t, k_t, v_t) in enumerate(zip(*bands)):
            k_m, v_m = memory.unbind(3)
            keys = torch.cat([pk, k_m, k_t], dim=2)
            values = torch.cat([pv, v_m, v_t], dim=2)
            outs.append(F.scaled_dot_product_attention(q_t, keys, values))
            if t == len(bands[0]) - 1:
                break  # the memory after the last band is not read
            n = k_t.shape[2]
            written = F.scaled_dot_product_attention(
                k_m @ write_query,
                torch.cat([k_m, k_t], dim=2),
                torch.cat([memory.flatten(3), torch.cat([k_t, v_t], dim=3)], dim=2),
                attn_mask=write_mask[:, : slots + n],
                scale=write_scale,
            )
            memory = biased_normalize(written.unflatten(3, (2, d)), bias, norm)
        return torch.cat(outs, dim=2)
