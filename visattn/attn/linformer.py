"""Linformer: Self-Attention with Linear Complexity — https://arxiv.org/abs/2006.04768

Sequence method on the flattened map (raster order). The length-n projections E, F ∈ R^{k×n} are defined on a
reference grid (``ref_size``, n = h_ref·w_ref) and resampled to the input's H x W by bilinear interpolation
(``visattn.layers.reference_grid``), scaled by n_ref / N so a projection keeps its meaning (a weighted average
over the image) at any resolution. Not causal: every projected key mixes all positions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..layers import (
    AttnBlock,
    factory_kwargs,
    multihead_sdpa,
    resolve_heads,
    to_map,
    to_tokens,
)
from ..layers.reference_grid import check_ref_size, resample_grid
from ..registry import register_attn

SHARING = ("none", "headwise", "key_value")


@register_attn(
    "linformer",
    title="Linformer: Self-Attention with Linear Complexity",
    arxiv="2006.04768",
    year=2020,
    family="lowrank",
    complexity="O(N·k·D)",
    flops_exponent=1.0,
    native_2d=False,
    causal=False,
    identity_init=True,
    idea="project keys and values along positions to k rows with learned E, F, then softmax attention",
    reference="https://github.com/tatp22/linformer-pytorch",
)
class Linformer(AttnBlock):
    """``x + W_o softmax(Q (E K)ᵀ / √d) (F V)``, multi-head, with E, F resampled from a reference grid.

    E and F start as the paper's Johnson–Lindenstrauss projections, N(0, 1/k) entries. At H x W they are
    ``resample(E) · n_ref / N``; at the reference resolution this is E itself, and with k = N and E = F = I
    the block is exactly full softmax attention.

    Args:
        channels: input channels C.
        k: projected length (paper: 256).
        heads: attention heads (default: ``default_heads(C)``, heads of about 32 channels).
        sharing: the paper's parameter sharing: ``"none"`` (E_i, F_i per head), ``"headwise"`` (one E and
            one F for all heads) or ``"key_value"`` (one matrix for E and F and all heads).
        ref_size: reference grid (h_ref, w_ref) on which E, F are defined (int for a square; default 32, so
            n_ref = 1024 > k).
    """

    def __init__(
        self,
        channels: int,
        *,
        k: int = 256,
        heads: int | None = None,
        sharing: str = "headwise",
        ref_size: int | tuple[int, int] = 32,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"linformer: k must be a positive int, got {k!r}")
        if sharing not in SHARING:
            raise ValueError(f"linformer: sharing must be one of {SHARING}, got {sharing!r}")
        heads = resolve_heads(channels, heads, "linformer")
        dd = factory_kwargs(device, dtype)
        self.k, self.heads, self.sharing = k, heads, sharing
        self.ref_hw = check_ref_size(ref_size, "linformer")
        n_ref = self.ref_hw[0] * self.ref_hw[1]

        self.q = nn.Linear(channels, channels, **dd)
        self.kv = nn.Linear(channels, 2 * channels, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        n_proj = heads if sharing == "none" else 1
        std = k**-0.5
        self.e = nn.Parameter(torch.randn(n_proj, k, n_ref, **dd) * std)
        self.f = None if sharing == "key_value" else nn.Parameter(torch.randn(n_proj, k, n_ref, **dd) * std)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, k={self.k}, heads={self.heads}, sharing={self.sharing!r}, "
            f"ref_size={self.ref_hw}"
        )

    def projection(self, weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``weight`` (n_proj, k, n_ref) resampled to (n_proj, k, H·W), scaled by n_ref / (H·W)."""
        n_ref = self.ref_hw[0] * self.ref_hw[1]
        return resample_grid(weight, self.ref_hw, (height, width), dim=-1) * (n_ref / (height * width))

    def _project(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # (n_proj, k, N) x (B, N, C) -> (B, k, C); one matmul over all channels when the heads share p.
        if p.shape[0] == 1:
            return torch.einsum("kn,bnc->bkc", p[0], t)
        t = rearrange(t, "b n (h d) -> b h n d", h=self.heads)
        return rearrange(torch.einsum("hkn,bhnd->bhkd", p, t), "b h k d -> b k (h d)")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        tokens = to_tokens(x)
        keys, values = self.kv(tokens).chunk(2, dim=-1)
        e = self.projection(self.e, h, w)
        f = e if self.f is None else self.projection(self.f, h, w)
        out = multihead_sdpa(self.q(tokens), self._project(e, keys), self._project(f, values), self.heads)
        return x + to_map(self.proj(out), h, w)
