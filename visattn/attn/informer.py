"""Informer: Beyond Efficient Transformer for Long Sequence Time-Series Forecasting (ProbSparse attention)
— https://arxiv.org/abs/2012.07436

Sequence method on the flattened map (raster order): the u = c·ln N pixels whose queries look most
"active" (max minus mean of their scores on c·ln N sampled keys) attend to every pixel; the other
("lazy") pixels output the mean of V. Causal: lazy pixels take the running mean of V, and a pixel is
active when its measure is in the top u/N fraction of the measures of pixels <= it (capped at 2u).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import AttnBlock, factory_kwargs, resolve_heads, to_map, to_tokens, upcast_for_accuracy
from ..layers.compat import is_exporting
from ..layers.hashing import resolve_seed
from ..registry import register_attn

_MASK31 = (1 << 31) - 1


def hashed_uniform(n: int, seed: int | torch.Tensor, rows: int, device=None) -> torch.Tensor:
    """(rows, n) pseudo-random numbers in [0, 1) from a counter-based integer hash of (seed, row, i).

    A seeded generator that needs no state and no ``torch.Generator`` (so it compiles), gives the same
    draw on every device and for every batch, and works for any n.
    """
    i = torch.arange(n, device=device, dtype=torch.int64).view(1, -1)
    r = torch.arange(rows, device=device, dtype=torch.int64).view(-1, 1)
    h = (i * 0x2F0B3A49 + r * 0x1B873593 + (seed & _MASK31)) & _MASK31
    for mult in (0x5BD1E995 & _MASK31, 0x27D4EB2F):
        # 31-bit xorshift-multiply rounds: products stay below 2^62, so int64 never overflows.
        h = h ^ (h >> 15)
        h = (h * mult) & _MASK31
    h = h ^ (h >> 13)
    return h.to(torch.float64).div(float(_MASK31 + 1)).float()


# floor(e^k): for an integer n > 1, ceil(ln n) = #{k : floor(e^k) < n} (e^k is never an integer).
_EXP_FLOORS = [math.floor(math.exp(k)) for k in range(40)]


def budget_tensor(n: int, factor: int, device=None) -> torch.Tensor:
    """``min(factor·ceil(ln n), n)`` (1 for n = 1) as a 0-d int64 tensor, by integer comparisons only,
    so that it stays a function of a symbolic n in an exported graph."""
    count = (torch.tensor(_EXP_FLOORS, device=device) < n).sum()
    return (count * factor).clamp(max=n).clamp(min=1)


_MAX_SCAN_ROUNDS = 25  # ceil(log2(2^31 / 64)): blocks of 64 up to n < 2^31


def causal_active(
    measure: torch.Tensor, u: int, cap: int, block: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal ProbSparse selection: query i is active when its measure is among the top
    ``ceil(u·(i+1)/n)`` measures of queries <= i (the paper's top fraction u/n, applied to every
    prefix; at i = n - 1 it is the paper's rule), finite, and fewer than ``cap`` earlier queries were
    active. Every test reads positions <= i only.

    Args:
        measure: (b, h, n) sparsity measures (-inf: no sampled key yet).
        block: raster blocks of this length are compared densely; earlier blocks through their top u.
    Returns:
        (b, h, cap) positions, the active ones first in raster order, and a (b, h, cap) flag of the
        slots that hold an active query (the others hold distinct unused positions).
    """
    b, h, n = measure.shape
    pos = torch.arange(n, device=measure.device)
    ninf = float("-inf")
    # M_i is in the top k of a prefix iff fewer than k prefix measures exceed it; as k <= u, counting
    # among the top u of the earlier blocks is exact whenever it matters.
    m = F.pad(measure, (0, (block - n % block) % block), value=ninf).unflatten(-1, (-1, block))
    nb = m.shape[2]  # (b, h, nb, T)
    tops = F.pad(m.topk(min(u, block), dim=-1).values, (0, max(u - block, 0)), value=ninf)
    # Prefix top-u over blocks by a doubling (Hillis-Steele) scan: merged ranges are disjoint. It takes
    # ceil(log2(nb)) rounds; an exported graph serves every H, W, so it runs enough rounds for any
    # n < 2^31 (rounds past nb merge only -inf). Pad-then-crop: no slice end below zero.
    symbolic = is_exporting() and not isinstance(nb, int)
    rounds = _MAX_SCAN_ROUNDS if symbolic else (nb - 1).bit_length()
    for r in range(rounds):
        shift = min(1 << r, nb) if symbolic else 1 << r
        prev = F.pad(tops, (0, 0, shift, 0), value=ninf)[:, :, :nb]
        tops = torch.cat([tops, prev], dim=-1).topk(u, dim=-1).values
    earlier = F.pad(tops, (0, 0, 1, 0), value=ninf)[:, :, :nb]  # top u of the blocks before
    above = (earlier.unsqueeze(-2) > m.unsqueeze(-1)).sum(-1)
    inside = torch.ones(block, block, dtype=torch.bool, device=measure.device).tril()
    above = above + ((m.unsqueeze(-2) > m.unsqueeze(-1)) & inside).sum(-1)
    above = above.flatten(-2)[..., :n]
    candidate = measure.isfinite() & (above < (u * (pos + 1) + n - 1) // n)  # ceil(u·(i+1)/n)
    keep = candidate & (candidate.cumsum(-1) <= cap)
    slots = torch.where(keep, n - pos, 0).topk(cap, dim=-1).indices
    return slots, keep.gather(-1, slots)


@register_attn(
    "informer",
    title="Informer: Beyond Efficient Transformer for Long Sequence Time-Series Forecasting",
    arxiv="2012.07436",
    year=2021,
    family="sparse",
    complexity="O(N·log N·D)",
    flops_exponent=1.1,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="ProbSparse: only the c·ln N most peaked queries attend; the lazy ones output mean(V)",
    reference="https://github.com/zhouhaoyi/Informer2020",
    random_in_training=True,  # the sampled keys that score each query
)
class Informer(AttnBlock):
    """ProbSparse self-attention, ``x + proj(attn(x))`` with a zero-initialised projection.

    Per head: U = c·ceil(ln N) keys are sampled (one sample per head, shared by its queries: the
    score block is Q·K_sᵀ, never the (N, U, d) gather of the authors' code), the sparsity measure
    M(q_i) = max_j s_ij - mean_j s_ij over the sampled scores (the mean divides by the sample count, not
    by N as the authors' code does), and the u = c·ceil(ln N) queries of largest M attend to all keys
    through SDPA. The other queries output mean(V). With u = N (a large ``factor``) this is exactly full
    softmax attention.

    Sampling: in eval the keys come from a counter-based hash seeded by ``seed`` (deterministic, the
    same for every sample of a batch); in training they are redrawn from the global RNG at every call,
    as the paper samples afresh.

    ``causal=True``: lazy queries output the running mean of V over pixels <= their own (the authors'
    code uses the running sum); active queries attend to keys <= their own position (ProbMask); the
    measure of a query uses only its sampled keys <= its position. Adapted selection (a top-u over all
    queries would let later pixels decide whether an earlier one is active): query i is active when
    its measure is among the top ceil(u·(i+1)/N) measures of queries <= i, i.e. in the paper's top
    fraction u/N of every prefix (the paper's rule at i = N - 1), capped at 2u active queries in
    raster order (a static budget, so the cost stays O(u·N); later candidates beyond the cap are
    lazy). Queries before the first sampled key have no measure and are lazy. About u + ln(N/u)
    queries are active on i.i.d. measures; with u = N every query is active (full causal attention).
    The encoder's distilling (conv + max-pool between layers) changes resolution and is not part of
    this shape-preserving block.

    Args:
        channels: input channels C.
        heads: attention heads (default: ``default_heads(C)``).
        factor: c, the sampling factor for both u and U (paper: 5).
        qkv_bias: bias of the q/k/v projections.
        seed: seed of the eval-time key sample (None: drawn from the global RNG at construction).
        causal: raster-order causal attention.
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        factor: int = 5,
        qkv_bias: bool = True,
        seed: int | None = None,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        heads = resolve_heads(channels, heads, "informer")
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"informer: factor must be an int >= 1, got {factor!r}")
        dd = factory_kwargs(device, dtype)
        self.heads, self.head_dim, self.factor, self.causal = heads, channels // heads, factor, bool(causal)
        # A buffer, so the eval-time sample travels with the state dict.
        self.register_buffer("seed", torch.tensor(resolve_seed(seed) & _MASK31, device=device))
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def budget(self, n: int) -> int:
        """u (= U): min(c·ceil(ln n), n), as the authors' code."""
        if isinstance(n, int) or not is_exporting():
            return min(self.factor * math.ceil(math.log(n)) if n > 1 else 1, n)
        # Exported with dynamic H, W, ``math.log`` would fix u at the example's value: the same
        # integer from tensor ops instead, read back as an unbacked size.
        u = budget_tensor(n, self.factor).item()
        torch._check(u >= 1)
        torch._check(u <= n)
        return u

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        q, k, v = rearrange(self.qkv(to_tokens(x)), "b n (s h d) -> s b h n d", s=3, h=self.heads)
        b, h, n, d = q.shape
        u = self.budget(n)
        pos = torch.arange(n, device=x.device)

        with torch.no_grad():
            noise = (
                torch.rand(h, n, device=x.device)
                if self.training
                else hashed_uniform(n, self.seed, h, x.device)
            )
            sample = noise.topk(u, dim=-1).indices  # (h, U): U distinct keys per head
            k_s = k.gather(2, sample.view(1, h, u, 1).expand(b, -1, -1, d))
            scores = upcast_for_accuracy(q @ k_s.transpose(-1, -2))  # (b, h, n, U)
            if self.causal:
                seen = sample.view(1, h, 1, u) <= pos.view(1, 1, n, 1)
                top = scores.masked_fill(~seen, float("-inf")).amax(-1)
                mean = scores.masked_fill(~seen, 0).sum(-1) / seen.sum(-1).clamp_min(1)
                measure = torch.where(seen.any(-1), top - mean, float("-inf"))
                active, keep = causal_active(measure, u, min(n, 2 * u))
            else:
                measure = scores.amax(-1) - scores.mean(-1)
                active = measure.topk(u, dim=-1).indices.sort(-1).values  # (b, h, u), in raster order

        q_top = q.gather(2, active.unsqueeze(-1).expand(-1, -1, -1, d))
        mask = pos.view(1, 1, 1, n) <= active.unsqueeze(-1) if self.causal else None
        out_top = F.scaled_dot_product_attention(q_top, k, v, attn_mask=mask)
        if self.causal:
            lazy = v.cumsum(2) / torch.arange(1, n + 1, device=x.device, dtype=v.dtype).view(1, 1, n, 1)
            # Unused slots (fewer active queries than the cap) write back their own lazy output.
            lazy_top = lazy.gather(2, active.unsqueeze(-1).expand(-1, -1, -1, d))
            out_top = torch.where(keep.unsqueeze(-1), out_top, lazy_top)
        else:
            lazy = v.mean(2, keepdim=True).expand(-1, -1, n, -1)
        out = lazy.scatter(2, active.unsqueeze(-1).expand(-1, -1, -1, d), out_top)
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))
        return x + to_map(out, height, width)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, factor={self.factor}, causal={self.causal}"
