"""Synthesizer: Rethinking Self-Attention in Transformer Models — https://arxiv.org/abs/2005.00743

Sequence method on the flattened map (raster order). Its attention has a fixed length ℓ; here ℓ is the
pixel count of a reference grid (``ref_size``, default 16x16) and every position-indexed tensor (the random
map R, the dense logits over keys, the factorised row/column logits) is resampled to the input's H x W by
bilinear interpolation (``visattn.layers.reference_grid``), so one block takes any resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import (
    AttnBlock,
    factory_kwargs,
    merge_heads,
    resolve_heads,
    split_heads,
    to_map,
    to_tokens,
)
from ..layers.reference_grid import (
    attend_with_weights,
    check_ref_size,
    resample_attention_map,
    resample_axis,
    resample_grid,
)
from ..registry import register_attn

MODES = ("dense", "random", "factorized_dense", "factorized_random")


@register_attn(
    "synthesizer",
    title="Synthesizer: Rethinking Self-Attention in Transformer Models",
    arxiv="2005.00743",
    year=2020,
    family="nonlocal",
    complexity="O(N²·D) (dense: + N·D·ℓ to synthesise the logits)",
    flops_exponent=2.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="attention weights synthesised without query-key products: a per-token MLP or a learned map",
    reference="none",
)
class Synthesizer(AttnBlock):
    """Synthesizer attention ``x + W_o softmax(S) G(x)`` with synthetic logits S, per head.

    Modes (ℓ = h_ref·w_ref, d = head dim):

    - ``"dense"``: S_i = W2 ReLU(W1 x_i + b1) + b2 ∈ R^ℓ, a logit per reference key, from the query alone.
    - ``"random"``: S = R ∈ R^{ℓ×ℓ}, a learned (``trainable_random=True``) or fixed random map.
    - ``"factorized_dense"``: two outputs A ∈ R^{h_ref}, B ∈ R^{w_ref} of the same MLP; the paper tiles
      them to length ℓ = a·b and multiplies, which on the grid is S_i[r, c] = A_r · B_c (A tiled along
      rows, B along columns).
    - ``"factorized_random"``: S = R1 R2ᵀ with R1, R2 ∈ R^{ℓ×k} (paper k = 8).

    Resampling to H x W interpolates the key grid (dense), both grids (random, through R1 and R2 for the
    factorised form), or the row / column vectors (factorised dense), all the same bilinear map. With
    ``causal=True`` keys after the query (raster order) are masked after resampling and the softmax
    renormalises over the rest; the logits never depend on other tokens, so nothing else can leak. The
    N x N weights are inherent to the method (O(N²), ``flops_exponent`` 2).

    Args:
        channels: input channels C.
        mode: one of ``"dense"``, ``"random"``, ``"factorized_dense"``, ``"factorized_random"``.
        heads: attention heads (default: ``default_heads(C)``, heads of about 32 channels).
        ref_size: reference grid (h_ref, w_ref) on which the fixed length ℓ is defined (int for a square).
        rank: k of ``"factorized_random"`` (paper: 8).
        trainable_random: ``"random"`` mode learns R (True) or keeps the random R fixed (False, a buffer).
        causal: raster-order causal masking.
    """

    def __init__(
        self,
        channels: int,
        *,
        mode: str = "dense",
        heads: int | None = None,
        ref_size: int | tuple[int, int] = 16,
        rank: int = 8,
        trainable_random: bool = True,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if mode not in MODES:
            raise ValueError(f"synthesizer: mode must be one of {MODES}, got {mode!r}")
        heads = resolve_heads(channels, heads, "synthesizer")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"synthesizer: rank must be a positive int, got {rank!r}")
        dd = factory_kwargs(device, dtype)
        self.mode, self.heads, self.causal = mode, heads, causal
        self.ref_hw = check_ref_size(ref_size, "synthesizer")
        hr, wr = self.ref_hw
        n_ref, head_dim = hr * wr, channels // heads

        self.value = nn.Linear(channels, channels, **dd)  # G(X)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

        if mode in ("dense", "factorized_dense"):
            out_len = n_ref if mode == "dense" else hr + wr
            self.hidden = nn.Linear(channels, channels, **dd)  # W1, b1
            bound = 1.0 / math.sqrt(head_dim)  # nn.Linear's default init for the per-head W2
            self.w2 = nn.Parameter(torch.empty(heads, head_dim, out_len, **dd).uniform_(-bound, bound))
            self.b2 = nn.Parameter(torch.empty(heads, out_len, **dd).uniform_(-bound, bound))
        elif mode == "random":
            r = torch.randn(heads, n_ref, n_ref, **dd)
            if trainable_random:
                self.r = nn.Parameter(r)
            else:
                self.register_buffer("r", r)
        else:
            # k^-1/4 per factor gives R1 R2ᵀ unit-variance entries, like the unfactorised R.
            scale = rank**-0.25
            self.r1 = nn.Parameter(torch.randn(heads, n_ref, rank, **dd) * scale)
            self.r2 = nn.Parameter(torch.randn(heads, n_ref, rank, **dd) * scale)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, mode={self.mode!r}, heads={self.heads}, ref_size={self.ref_hw}, "
            f"causal={self.causal}"
        )

    def logits(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Synthetic logits at H x W: (h, N, N) for the random modes, (B, h, N, N) for the dense ones."""
        hw = (height, width)
        if self.mode == "random":
            return resample_attention_map(self.r, self.ref_hw, hw)
        if self.mode == "factorized_random":
            r1 = resample_grid(self.r1, self.ref_hw, hw, dim=-2)
            r2 = resample_grid(self.r2, self.ref_hw, hw, dim=-2)
            return r1 @ r2.transpose(-1, -2)
        hid = split_heads(F.relu(self.hidden(tokens)), self.heads)
        s = torch.einsum("bhnd,hdl->bhnl", hid, self.w2) + self.b2[:, None]
        if self.mode == "dense":
            return resample_grid(s, self.ref_hw, hw, dim=-1)
        rows = resample_axis(s[..., : self.ref_hw[0]], height)
        cols = resample_axis(s[..., self.ref_hw[0] :], width)
        return rearrange(rows[..., :, None] * cols[..., None, :], "b h n r c -> b h n (r c)")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        tokens = to_tokens(x)
        v = split_heads(self.value(tokens), self.heads)
        out = attend_with_weights(self.logits(tokens, h, w), v, causal=self.causal)
        return x + to_map(self.proj(merge_heads(out)), h, w)
