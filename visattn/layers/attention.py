"""Multi-head projections + ``scaled_dot_product_attention``, shared by every softmax block."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .block import factory_kwargs

__all__ = [
    "default_heads",
    "resolve_heads",
    "split_heads",
    "merge_heads",
    "multihead_sdpa",
    "raster_causal_mask",
    "MultiHeadAttention",
]


def default_heads(channels: int, head_dim: int = 32) -> int:
    """Heads for ``channels`` with heads of about ``head_dim`` channels: the largest h <= C // head_dim
    (at least 1) that divides C."""
    heads = max(1, channels // head_dim)
    while channels % heads:
        heads -= 1
    return heads


def resolve_heads(channels: int, heads: int | None, block: str) -> int:
    """``heads`` or, when None, :func:`default_heads`; ValueError (naming ``block``) unless it is a positive
    int dividing ``channels``."""
    heads = default_heads(channels) if heads is None else heads
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or channels % heads:
        raise ValueError(f"{block}: heads must be a positive divisor of channels ({channels}), got {heads!r}")
    return heads


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, h*d) -> (B, h, N, d)."""
    return rearrange(t, "b n (h d) -> b h n d", h=heads)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) -> (B, N, h*d)."""
    return rearrange(t, "b h n d -> b n (h d)")


def raster_causal_mask(n_q: int, n_k: int | None = None, *, device=None) -> torch.Tensor:
    """Boolean (n_q, n_k) mask, True where key position <= query position (raster order).

    Prefer ``causal=True`` in :func:`multihead_sdpa` when queries and keys are the same tokens: it
    never materialises the mask.
    """
    n_k = n_q if n_k is None else n_k
    q = torch.arange(n_q, device=device).unsqueeze(1)
    k = torch.arange(n_k, device=device).unsqueeze(0)
    return k <= q


def multihead_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    *,
    causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v per head, for (B, N, C) tokens; returns (B, Nq, C_v).

    ``scale`` defaults to 1/sqrt(head dim). ``causal`` masks key j > query i (queries and keys in the
    same raster order, Nq == Nk).
    """
    out = F.scaled_dot_product_attention(
        split_heads(q, heads),
        split_heads(k, heads),
        split_heads(v, heads),
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=causal and attn_mask is None,
        scale=scale,
    )
    return merge_heads(out)


class MultiHeadAttention(nn.Module):
    """Linear q/k/v projections, multi-head SDPA, output projection, on (B, N, C) tokens.

    ``zero_init_out=True`` zero-initialises the output projection, so ``x + attn(x)`` is exactly the
    identity at initialisation (the block contract's ``identity_init``).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        qkv_bias: bool = True,
        zero_init_out: bool = True,
        attn_drop: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"MultiHeadAttention: dim ({dim}) must be divisible by heads ({heads})")
        dd = factory_kwargs(device, dtype)
        self.heads = heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        if zero_init_out:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        causal: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = x if context is None else context
        k, v = self.kv(context).chunk(2, dim=-1)
        out = multihead_sdpa(
            self.q(x),
            k,
            v,
            self.heads,
            causal=causal,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
        )
        return self.proj(out)
