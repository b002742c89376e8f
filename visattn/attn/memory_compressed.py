"""Generating Wikipedia by Summarizing Long Sequences (memory-compressed attention) —
https://arxiv.org/abs/1801.10198

Sequence method on the flattened map (raster order): queries stay at full resolution while keys and values
are compressed by a strided 2-D convolution (kernel = stride = s, the 1-D kernel-3/stride-3 conv made 2-D;
s² fewer keys). Causal use masks whole compressed cells in raster order and adds each query's own
uncompressed key.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import (
    AttnBlock,
    ConvPosEnc,
    accuracy_dtype,
    ceil_div,
    factory_kwargs,
    multihead_sdpa,
    resolve_heads,
    to_map,
    to_tokens,
)
from ..registry import register_attn


def cell_last_positions(height: int, width: int, stride: int, *, device=None) -> torch.Tensor:
    """Raster position of the last real pixel of each s x s cell (cells in raster order), shape (M,).

    A cell becomes visible to a query once this position is <= the query's position: then all its real pixels
    are in the past (the padding at the bottom/right carries no input).
    """
    rows = torch.arange(0, height, stride, device=device).add(stride - 1).clamp_max(height - 1)
    cols = torch.arange(0, width, stride, device=device).add(stride - 1).clamp_max(width - 1)
    return (rows[:, None] * width + cols[None, :]).flatten()


@register_attn(
    "memory_compressed",
    title="Generating Wikipedia by Summarizing Long Sequences",
    arxiv="1801.10198",
    year=2018,
    family="memory",
    complexity="O(N²·D / s²)",
    flops_exponent=2.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="full-resolution queries attend to keys/values compressed by a strided s x s convolution",
    reference="https://github.com/lucidrains/memory-compressed-attention",
)
class MemoryCompressedAttention(AttnBlock):
    """``x + W_o softmax(Q K_cᵀ/√d) V_c`` with K_c, V_c = strided s x s conv of the (padded) map, per head.

    The K/V projection and the compressing conv are one ``Conv2d(C, 2C, s, stride=s)`` (a linear projection
    followed by a strided conv is a strided conv). Logits are scaled by head-dim^-1/2 (the public reference
    uses model-dim^-1/2), and there is no learned null key. The map is zero-padded at the bottom/right to
    multiples of s; queries exist only at real pixels.

    Causal (``causal=True``): a compressed cell is visible to the query at raster position p only once every
    real pixel of the cell is at a position <= p, i.e. once the cell's bottom-right pixel has been reached.
    Queries in the first s-1 rows of a band of cells see no cell of that band, and queries of the first band
    may see none at all; so in causal mode every query also attends to its own uncompressed key/value
    (``Linear(C, 2C)`` of its own pixel) in the same softmax, which is never empty. The positional encoding is
    then causal too. This path writes the (N, M+1) logits explicitly instead of using fused SDPA.

    Args:
        channels: input channels C.
        compression: s, kernel and stride of the compressing conv (paper: 3).
        heads: attention heads (default: ``default_heads(C)``, heads of about 32 channels).
        pos_enc: add a conditional 2-D positional encoding (CPVT's PEG, causal when ``causal``) to the input;
            the attention itself only sees content.
        causal: raster-order causal masking on whole compressed cells.
    """

    def __init__(
        self,
        channels: int,
        *,
        compression: int = 3,
        heads: int | None = None,
        pos_enc: bool = True,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if isinstance(compression, bool) or not isinstance(compression, int) or compression < 1:
            raise ValueError(f"memory_compressed: compression must be a positive int, got {compression!r}")
        heads = resolve_heads(channels, heads, "memory_compressed")
        dd = factory_kwargs(device, dtype)
        self.compression, self.heads, self.causal = compression, heads, causal
        self.pos = ConvPosEnc(channels, 3, causal=causal, **dd) if pos_enc else None
        self.q = nn.Linear(channels, channels, **dd)
        self.kv = nn.Conv2d(channels, 2 * channels, compression, stride=compression, **dd)
        self.kv_self = nn.Linear(channels, 2 * channels, **dd) if causal else None
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def extra_repr(self) -> str:
        c, s = self.channels, self.compression
        return f"channels={c}, compression={s}, heads={self.heads}, causal={self.causal}"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        feat = x if self.pos is None else self.pos(x)
        tokens = to_tokens(feat)
        q = self.q(tokens)
        s = self.compression
        # Always padded (possibly by 0) at the bottom/right: no shape test, so exported graphs stay dynamic.
        padded = F.pad(feat, (0, ceil_div(w, s) * s - w, 0, ceil_div(h, s) * s - h))
        k, v = to_tokens(self.kv(padded)).chunk(2, dim=-1)  # (B, M, C) each
        if self.causal:
            out = self._causal_attention(q, k, v, tokens, h, w)
        else:
            out = multihead_sdpa(q, k, v, self.heads)
        return x + to_map(self.proj(out), h, w)

    def _causal_attention(self, q, k, v, tokens, h: int, w: int) -> torch.Tensor:
        k_self, v_self = self.kv_self(tokens).chunk(2, dim=-1)
        q, k, v, k_self, v_self = (
            rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v, k_self, v_self)
        )
        scale = q.shape[-1] ** -0.5
        visible = (
            cell_last_positions(h, w, self.compression, device=q.device)[None, :]
            <= torch.arange(h * w, device=q.device)[:, None]
        )
        acc = accuracy_dtype(q.dtype)
        # In the logits' dtype: a float32 mask would be the one float32 tensor of a float64 run.
        bias = torch.zeros(visible.shape, device=q.device, dtype=acc).masked_fill_(~visible, float("-inf"))
        cells = (q @ k.transpose(-1, -2)).to(acc) * scale + bias  # (B, h, N, M)
        own = (q * k_self).sum(-1, keepdim=True).to(acc) * scale  # (B, h, N, 1)
        attn = torch.cat([cells, own], dim=-1).softmax(dim=-1).to(v.dtype)
        out = attn[..., :-1] @ v + attn[..., -1:] * v_self
        return rearrange(out, "b h n d -> b n (h d)")
