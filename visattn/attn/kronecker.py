"""Kronecker Attention Networks — https://arxiv.org/abs/2007.08442

Native 2D: the map is summarised by its H row averages (mean over W) and W column averages (mean
over H). KAO_QKV attends among these H + W tokens and rebuilds an H×W output as the outer sum of
the row and column outputs, O((H+W)²·D); KAO_KV lets every pixel query the H + W tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import (
    AttnBlock,
    factory_kwargs,
    multihead_sdpa,
    resolve_heads,
    to_map,
    to_tokens,
)
from ..registry import register_attn

_VARIANTS = ("qkv", "kv")


@register_attn(
    "kronecker",
    title="Kronecker Attention Networks",
    arxiv="2007.08442",
    year=2020,
    family="structured2d",
    complexity="O((H+W)²·D) (KAO_QKV); O(H·W·(H+W)·D) (KAO_KV)",
    flops_exponent=1.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="attention over the H row means and W column means; KAO_QKV outer-sums the row and column outputs",
    reference="https://github.com/lucidrains/kronecker-attention-pytorch",
)
class KroneckerAttention(AttnBlock):
    """Kronecker attention operator (KAO) in a residual block: ``x + proj(KAO(x))``.

    The H + W tokens are the lateral averages (mean over W, one per row) followed by the
    horizontal averages (mean over H, one per column). Projections are per-token linear maps, so
    they are applied to the H + W averages rather than to every pixel (averaging commutes with
    them). Attention is multi-head softmax with 1/sqrt(head dim) scaling through SDPA. The output
    projection is zero-initialised, so the block is the identity at initialisation.

    ``variant="qkv"`` (KAO_QKV, default): queries, keys and values are the H + W tokens; the
    output at pixel (i, j) is ``proj(o_row[i] + o_col[j])``, the outer (Kronecker) sum, computed
    as ``proj(o_row[i]) + proj(o_col[j])`` without materialising the sum before the residual add.
    Cost O((H+W)²·D + H·W·D); for square maps (H+W)² = 4·H·W, so FLOPs grow linearly in N.

    ``variant="kv"`` (KAO_KV): every pixel is a query, keys and values are the H + W tokens. Cost
    O(H·W·(H+W)·D), i.e. N^1.5 for square maps (the registered exponent is the default variant's).

    Args:
        channels: input channels C (also the attention width).
        variant: ``"qkv"`` (KAO_QKV) or ``"kv"`` (KAO_KV).
        heads: attention heads; default ``default_heads(C)`` (heads of about 32 channels).
        qkv_bias: bias in the query/key/value projection.
    """

    def __init__(
        self,
        channels: int,
        *,
        variant: str = "qkv",
        heads: int | None = None,
        qkv_bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if variant not in _VARIANTS:
            raise ValueError(f"kronecker: variant must be one of {_VARIANTS}, got {variant!r}")
        heads = resolve_heads(channels, heads, "kronecker")
        dd = factory_kwargs(device, dtype)
        self.variant = variant
        self.heads = heads
        # One projection for both variants, so their state dicts are interchangeable.
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @staticmethod
    def average_tokens(x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H + W, C): the H row means, then the W column means."""
        h, w = x.shape[-2:]
        # sum() * (1/n), not mean(): sum's backward is a broadcast view that autograd adds into the
        # residual gradient, where mean's backward materialises two full-size (B, C, H, W) tensors.
        return rearrange(
            torch.cat([x.sum(dim=3) * (1.0 / w), x.sum(dim=2) * (1.0 / h)], dim=2), "b c n -> b n c"
        )

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = self.average_tokens(x)
        c = self.channels
        if self.variant == "kv":
            weight, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(to_tokens(x), weight[:c], None if bias is None else bias[:c])
            k, v = F.linear(tokens, weight[c:], None if bias is None else bias[c:]).chunk(2, dim=-1)
            out = self.proj(multihead_sdpa(q, k, v, self.heads))
            return x + to_map(out, h, w)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        out = F.linear(multihead_sdpa(q, k, v, self.heads), self.proj.weight)
        # The bias goes on the row half only: proj(o_row + o_col) has it once.
        rows = rearrange(out[:, :h] + self.proj.bias, "b h c -> b c h 1")
        cols = rearrange(out[:, h:], "b w c -> b c 1 w")
        # In place on a fresh tensor: add's backward saves nothing, and this avoids one H×W buffer.
        return (x + rows).add_(cols)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, variant={self.variant!r}, heads={self.heads}"
