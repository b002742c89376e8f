"""Set Transformer: induced set attention block (ISAB) — https://arxiv.org/abs/1810.00825

Set method adapted to 2D: the map is flattened to H*W tokens and a fixed 2D sine-cosine encoding is
added, because ISAB is permutation-equivariant and would otherwise lose the layout; m learned
inducing points summarise the tokens (MAB(I, X)) and the tokens read them back (MAB(X, H)).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from ..layers import AttnBlock, factory_kwargs, sincos_2d, to_map, to_tokens
from ..registry import register_attn

__all__ = ["ISAB", "MAB"]


class MAB(nn.Module):
    """Multihead attention block of the paper, with its LayerNorms and row-wise feed-forward:
    ``MAB(X, Y) = LN(H + rFF(H))``, ``H = LN(X + Multihead(X, Y, Y))``.

    Multihead has its own output projection W^O and scales logits by 1/sqrt(head dim); the residual
    adds the raw query X (the official code adds the projected query, has no W^O and scales by
    sqrt(dim_V) — the pitfalls of methods.md row 3). rFF is one Linear + ReLU, as in the official code.

    ISAB only ever calls a MAB with one side of m << N tokens, so the two entry points fold the
    projections on the N-token side into the m-token side (exact algebra, see each method): no
    N-token q/k/v/out projection is computed or saved for backward.

    Args:
        dim: token width.
        heads: attention heads (``dim % heads == 0``).
    """

    def __init__(self, dim: int, heads: int, *, device=None, dtype=None) -> None:
        super().__init__()
        dd = factory_kwargs(device, dtype)
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim, **dd)
        # A key bias adds q·b_k to every logit of a query alike; the softmax cancels it, so it
        # could never learn (zero gradient). Leaving it out also lets `summarise` fold W_k exactly.
        self.k = nn.Linear(dim, dim, bias=False, **dd)
        self.v = nn.Linear(dim, dim, **dd)
        self.o = nn.Linear(dim, dim, **dd)
        self.norm1 = nn.LayerNorm(dim, **dd)
        self.rff = nn.Linear(dim, dim, **dd)
        self.norm2 = nn.LayerNorm(dim, **dd)

    def _head_weights(self, layer: nn.Linear) -> torch.Tensor:
        return rearrange(layer.weight, "(h d) c -> h d c", h=self.heads)

    def _finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x + attn)
        return self.norm2(h + F.relu(self.rff(h)))

    def summarise(self, queries: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """MAB(queries, x) for few queries (B, m, C) and many tokens x (B, N, C).

        q_h · (W_k,h x) = (W_k,hᵀ q_h) · x: each head's query is mapped into token space and SDPA
        runs on the raw tokens as keys and values (one head of width C holding all h·m queries);
        W_v,h is applied to the m results.
        """
        q = rearrange(self.q(queries), "b m (h d) -> b h m d", h=self.heads)
        q = torch.einsum("bhmd,hdc->bhmc", q, self._head_weights(self.k))
        read = F.scaled_dot_product_attention(
            rearrange(q, "b h m c -> b 1 (h m) c"), x.unsqueeze(1), x.unsqueeze(1), scale=self.scale
        )
        read = rearrange(read, "b 1 (h m) c -> b h m c", h=self.heads)
        # Attention rows sum to one, so the value bias passes through unchanged.
        values = torch.einsum("bhmc,hdc->bmhd", read, self._head_weights(self.v)).flatten(2) + self.v.bias
        return self._finish(queries, self.o(values))

    def broadcast_attention(self, x: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention of MAB(x, memory) for many queries x (B, N, C) and few keys/values memory
        (B, m, C), as weights (B, N, h·m) and W^O-projected values (B, h·m, C);
        ``mix_and_finish`` completes the block.

        (W_q,h x + b_q,h) · k_h = x · (W_q,hᵀ k_h) + b_q,h · k_h, and W^O applied after the weighted
        sum of a head's values equals the weighted sum of values already projected by W^O's slice
        for that head: the N-token side needs one (N, C) x (C, h·m) matmul for the logits, a softmax
        over m per head, and one (N, h·m) x (h·m, C) matmul. The N x m weights are small (m <= 32),
        which is why this is two matmuls rather than h SDPA calls with C-wide heads.
        """
        k = rearrange(self.k(memory), "b m (h d) -> b h m d", h=self.heads)
        keys = torch.einsum("bhmd,hdc->bhmc", k, self._head_weights(self.q))
        bias = torch.einsum("bhmd,hd->bhm", k, rearrange(self.q.bias, "(h d) -> h d", h=self.heads))
        v = rearrange(self.v(memory), "b m (h d) -> b h m d", h=self.heads)
        w_o = rearrange(self.o.weight, "c (h d) -> h d c", h=self.heads)
        values = torch.einsum("bhmd,hdc->bhmc", v, w_o).flatten(1, 2)
        logits = torch.baddbmm(
            bias.flatten(1).unsqueeze(1),
            x,
            keys.flatten(1, 2).transpose(1, 2),
            alpha=self.scale,
            beta=self.scale,
        )
        attn = rearrange(logits, "b n (h m) -> b n h m", h=self.heads).softmax(-1).flatten(2)
        return attn, values

    def mix_and_finish(self, x: torch.Tensor, attn: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self._finish(x, torch.baddbmm(self.o.bias, attn, values))

    def broadcast(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """MAB(x, memory) for many queries x (B, N, C) and few keys/values memory (B, m, C)."""
        return self.mix_and_finish(x, *self.broadcast_attention(x, memory))


@register_attn(
    "isab",
    title="Set Transformer: A Framework for Attention-based Permutation-Invariant Neural Networks",
    arxiv="1810.00825",
    year=2018,
    family="memory",
    complexity="O(N·m·D)",
    flops_exponent=1.0,
    native_2d=False,
    causal=False,
    identity_init=True,
    idea="m learned inducing points attend to all pixels, then every pixel attends to the m summaries",
    reference="https://github.com/juho-lee/set_transformer",
)
class ISAB(AttnBlock):
    """``x + proj(ISAB_m(tokens + pos))`` with ``ISAB_m(X) = MAB(X, MAB(I, X))`` and ``proj``
    zero-initialised, so the block is exactly the identity at initialisation (the MAB's LayerNorms
    alone could not be).

    Args:
        channels: input channels C (the token width).
        num_inducing: inducing points m (paper: 16 or 32; 16 in its point-cloud experiments).
        heads: attention heads; None takes the paper's 4, reduced to gcd(4, C) when 4 does not
            divide C.
        recompute: in training, recompute the position-wise tail of the second MAB (value mix,
            LayerNorms, rFF, output projection) during backward instead of saving its five N x C
            activations (torch.utils.checkpoint; costs two N·C² matmuls more). Same results.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_inducing: int = 16,
        heads: int | None = None,
        recompute: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if isinstance(num_inducing, bool) or not isinstance(num_inducing, int) or num_inducing < 1:
            raise ValueError(f"isab: num_inducing must be a positive int, got {num_inducing!r}")
        heads = math.gcd(4, channels) if heads is None else heads
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or channels % heads:
            raise ValueError(
                f"isab: heads must be a positive divisor of channels ({channels}), got {heads!r}"
            )
        dd = factory_kwargs(device, dtype)
        self.num_inducing = num_inducing
        self.heads = heads
        self.recompute = bool(recompute)
        self.inducing = nn.Parameter(torch.empty(1, num_inducing, channels, **dd))
        nn.init.xavier_uniform_(self.inducing)
        self.mab_in = MAB(channels, heads, **dd)
        self.mab_out = MAB(channels, heads, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Token-major memory: SDPA's fused CPU kernel needs unit stride on the channel axis.
        tokens = to_tokens(x).contiguous() + sincos_2d(h, w, c, device=x.device, dtype=x.dtype)
        # repeat, not expand: a view of a parameter made under no_grad, passed to a submodule,
        # breaks the module hooks of FlopCounterMode (count_flops).
        summary = self.mab_in.summarise(self.inducing.repeat(b, 1, 1), tokens)
        attn, values = self.mab_out.broadcast_attention(tokens, summary)
        if self.recompute and self.training and torch.is_grad_enabled():
            out = checkpoint(self._tail, tokens, attn, values, use_reentrant=False)
        else:
            out = self._tail(tokens, attn, values)
        return x + to_map(out, h, w)

    def _tail(self, tokens: torch.Tensor, attn: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self.proj(self.mab_out.mix_and_finish(tokens, attn, values))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_inducing={self.num_inducing}, heads={self.heads}"
