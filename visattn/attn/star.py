"""Star-Transformer — https://arxiv.org/abs/1902.09113

Sequence method adapted to 2D: every pixel is a satellite whose ring window (i-1, i, i+1) becomes
its 3x3 neighbourhood (unfold windows of the padded keys/values; positions outside the map are masked
out of the softmax, not attended as zeros); it also attends its own embedding and the relay, and the
relay attends itself and every pixel. A fixed 2D sine-cosine encoding replaces the authors' learned
1D position embedding so any H, W works.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import (
    AttnBlock,
    MultiHeadAttention,
    factory_kwargs,
    multihead_sdpa,
    resolve_heads,
    sincos_2d,
    to_map,
    to_tokens,
)
from ..registry import register_attn

__all__ = ["StarTransformer"]

_K = 3  # the ring's window of 3 (i-1, i, i+1) becomes a 3x3 neighbourhood
_NB = _K * _K


def neighbourhood_mask(height: int, width: int, *, device=None) -> torch.Tensor:
    """(H*W, 9 + 2) bool, raster order: which of a pixel's 3x3 neighbours lie inside the map
    (unfold's order: row-major over the window), then True for its embedding and the relay."""
    ones = torch.ones(1, 1, height, width, device=device)
    inside = F.unfold(ones, _K, padding=_K // 2)[0].transpose(0, 1) > 0.5
    return torch.cat([inside, inside.new_ones(height * width, 2)], dim=1)


def satellite_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    kv_emb: torch.Tensor,
    kv_relay: torch.Tensor,
    mask: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """One joint softmax per pixel over [3x3 neighbours, own embedding, relay], per head.

    q (B, H, W, C), kv and kv_emb (B, H, W, 2C) as [keys | values], kv_relay (B, 1, 2C), mask from
    :func:`neighbourhood_mask`. The windows are ``Tensor.unfold`` views of the zero-padded keys and
    values, so nothing is gathered: SDPA would need an 11-key copy of every pixel's keys and values
    (11x the memory, and slower for 11 keys per query); the padded entries never get weight.
    """
    b, height, width, c = q.shape
    scale = (c // heads) ** -0.5
    windows = F.pad(kv, (0, 0, 1, 1, 1, 1)).unfold(1, _K, 1).unfold(2, _K, 1)
    nb_k, nb_v = rearrange(windows, "b h w (two g d) i j -> two b h w i j g d", two=2, g=heads)
    emb_k, emb_v = rearrange(kv_emb, "b h w (two g d) -> two b h w g d", two=2, g=heads)
    relay_k, relay_v = rearrange(kv_relay, "b 1 (two g d) -> two b 1 1 g d", two=2, g=heads)
    q = rearrange(q, "b h w (g d) -> b h w g d", g=heads) * scale
    logits = torch.cat(
        [
            (q[:, :, :, None, None] * nb_k).sum(-1).flatten(3, 4),
            (q * emb_k).sum(-1).unsqueeze(3),
            (q * relay_k).sum(-1).unsqueeze(3),
        ],
        dim=3,
    )  # (B, H, W, 11, heads)
    weights = logits.masked_fill(~mask.view(1, height, width, _NB + 2, 1), float("-inf")).softmax(3)
    weights = weights.unsqueeze(-1)
    out = (weights[:, :, :, :_NB].unflatten(3, (_K, _K)) * nb_v).sum((3, 4))
    out = out + weights[:, :, :, _NB] * emb_v + weights[:, :, :, _NB + 1] * relay_v
    return rearrange(out, "b h w g d -> b (h w) (g d)")


@register_attn(
    "star",
    title="Star-Transformer",
    arxiv="1902.09113",
    year=2019,
    family="sparse",
    complexity="O(N·D)",
    flops_exponent=1.0,
    native_2d=False,
    causal=False,
    identity_init=True,
    idea="pixels attend their 3x3 neighbours, their embedding and one relay node that attends all pixels",
    reference="https://github.com/fastnlp/fastNLP/blob/master/fastNLP/modules/encoder/star_transformer.py",
)
class StarTransformer(AttnBlock):
    """``x + proj(h_T)``, ``proj`` zero-initialised, after T cycles of the paper's Algorithm 1 on the
    embeddings ``e = tokens + pos`` (``h_0 = e``, relay ``s_0 = mean(e)``):

    ``h_i ← LN(ReLU(MultiAtt(h_i, [3x3 neighbours of h_i; e_i; s])))`` for every pixel, then
    ``s ← LN(ReLU(MultiAtt(s, [s; H])))`` with the updated satellites H (skipped in the last cycle,
    whose relay nothing reads). Each cycle has its own weights, as in the authors' code; there is no
    residual inside a cycle (the paper has none: e_i in every context plays that role), and ReLU,
    not the authors' code's leaky ReLU.

    Args:
        channels: input channels C.
        cycles: T (the authors' reproduction scripts use 2).
        heads: attention heads; None gives heads of about 32 channels (the authors' head_dim).
    """

    def __init__(
        self,
        channels: int,
        *,
        cycles: int = 2,
        heads: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1:
            raise ValueError(f"star: cycles must be a positive int, got {cycles!r}")
        heads = resolve_heads(channels, heads, "star")
        dd = factory_kwargs(device, dtype)
        self.cycles = cycles
        self.heads = heads
        self.satellite_attn = nn.ModuleList(
            MultiHeadAttention(channels, heads, zero_init_out=False, **dd) for _ in range(cycles)
        )
        self.satellite_norm = nn.ModuleList(nn.LayerNorm(channels, **dd) for _ in range(cycles))
        # The last cycle's relay update would feed nothing (the map output is the satellites).
        self.relay_attn = nn.ModuleList(
            MultiHeadAttention(channels, heads, zero_init_out=False, **dd) for _ in range(cycles - 1)
        )
        self.relay_norm = nn.ModuleList(nn.LayerNorm(channels, **dd) for _ in range(cycles - 1))
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        emb = to_tokens(x).contiguous() + sincos_2d(h, w, c, device=x.device, dtype=x.dtype)
        mask = neighbourhood_mask(h, w, device=x.device)
        sat, relay = emb, emb.mean(1, keepdim=True)
        for t, (sat_attn, sat_norm) in enumerate(zip(self.satellite_attn, self.satellite_norm, strict=True)):
            out = satellite_attention(
                sat_attn.q(sat).view(b, h, w, c),
                sat_attn.kv(sat).view(b, h, w, 2 * c),
                sat_attn.kv(emb).view(b, h, w, 2 * c),
                sat_attn.kv(relay),
                mask,
                self.heads,
            )
            sat = sat_norm(F.relu(sat_attn.proj(out)))
            if t < self.cycles - 1:
                relay_attn = self.relay_attn[t]
                k, v = torch.cat([relay_attn.kv(relay), relay_attn.kv(sat)], dim=1).chunk(2, dim=-1)
                out = multihead_sdpa(relay_attn.q(relay), k, v, self.heads)
                relay = self.relay_norm[t](F.relu(relay_attn.proj(out)))
        return x + to_map(self.proj(sat), h, w)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, cycles={self.cycles}, heads={self.heads}"
