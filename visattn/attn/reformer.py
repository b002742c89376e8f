"""Reformer: The Efficient Transformer (LSH attention) — https://arxiv.org/abs/2001.04451

Sequence method on the flattened map (raster order), content-based, so no positional code is added:
pre-norm tokens, shared-QK heads hashed by angular LSH, sorted by (bucket, position), cut into chunks
of m tokens that attend to themselves and the previous chunk, n_hashes rounds merged by logsumexp.
H*W is padded to a multiple of m; padded tokens sort last and are never attended.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import AttnBlock, factory_kwargs, resolve_heads, to_map, to_tokens
from ..layers.hashing import (
    angular_buckets,
    attend_lse,
    factor_buckets,
    gather_tokens,
    hash_draw,
    look_one_back,
    merge_rounds,
    resolve_seed,
    rotation_columns,
    seeded_normal,
    sort_with_inverse,
)
from ..registry import register_attn

# The paper's m_{i,j} = 1e5 for i = j: attend to yourself only when nothing else is available.
SELF_PENALTY = 1e5
# Adaptive bucket counts are capped here (trax's factorised hashing needs 64 rotation columns).
MAX_BUCKETS = 4096


@register_attn(
    "reformer",
    title="Reformer: The Efficient Transformer",
    arxiv="2001.04451",
    year=2020,
    family="hashing",
    complexity="O(N·log N·D²)",
    flops_exponent=1.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    exportable=False,  # measured: see docs/support.md
    idea="shared-QK attention within angular-LSH buckets: sort by hash, attend within chunk + previous chunk",
    reference="https://github.com/google/trax/tree/master/trax/models/reformer",
)
class Reformer(AttnBlock):
    """LSH self-attention, ``x + proj(attn(LayerNorm(x)))`` with a zero-initialised projection.

    Keys are the unit-normalised queries (shared-QK; logits q_i·q_j/|q_j| as in the authors' trax
    code). Per round r a token attends to the tokens of its sorted chunk and of the previous one (the
    paper's chunked key set; ``attend_across_buckets=False`` keeps only those of its own bucket), never
    to itself unless nothing else is left (logit - 1e5); a pair seen in several rounds is counted once
    (logit - log N_ij, the paper's multi-round rule, as in the authors' first trax code).
    Rounds are merged with weights softmax_r(logsumexp_r). ``causal=True`` also masks keys at later
    raster positions. Hash rotations are buffers drawn from a seeded generator (deterministic,
    batch-independent eval); in training they are redrawn every call, as the paper rehashes.

    With ``causal=True`` gradients never reach the future, but which past keys share a chunk with a
    query depends on where chunk boundaries fall, i.e. on the buckets of all tokens: a discrete
    dependence on the future that the paper's sort-and-chunk scheme has by construction.

    Args:
        channels: input channels C.
        heads: attention heads (default: heads of 32 channels, ``default_heads``).
        n_hashes: hashing rounds (paper: 1-8; 8 matches full attention in its experiments).
        chunk_size: chunk length m (paper: 64); maps with fewer tokens use one chunk of all of them.
        n_buckets: buckets per round, 1 or even. None: 2 * (padded tokens // m) as in trax (the
            paper's m = 2N / n_buckets), capped at 4096; above 128 buckets the hash is factorised.
        attend_across_buckets: attend to every key of the two chunks (True, the paper's chunked
            scheme and the authors' trax runs) or only to those of the query's bucket.
        allow_duplicates: skip the de-duplication over rounds (reformer-pytorch's default; it costs
            about as much again as the rest of the block on CPU).
        qkv_bias: bias of the shared-QK and value projections.
        seed: seed of the hash rotations (None: drawn from the global RNG at construction).
        causal: raster-order causal attention.
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        n_hashes: int = 8,
        chunk_size: int = 64,
        n_buckets: int | None = None,
        attend_across_buckets: bool = True,
        allow_duplicates: bool = False,
        qkv_bias: bool = True,
        seed: int | None = None,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        heads = resolve_heads(channels, heads, "reformer")
        for name, value in (("n_hashes", n_hashes), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"reformer: {name} must be a positive int, got {value!r}")
        if n_buckets is not None and (
            isinstance(n_buckets, bool)
            or not isinstance(n_buckets, int)
            or n_buckets < 1
            or (n_buckets > 1 and n_buckets % 2)
        ):
            raise ValueError(f"reformer: n_buckets must be None, 1 or an even int, got {n_buckets!r}")
        dd = factory_kwargs(device, dtype)
        self.heads, self.head_dim = heads, channels // heads
        self.n_hashes, self.chunk_size, self.n_buckets = n_hashes, chunk_size, n_buckets
        self.attend_across_buckets, self.allow_duplicates = attend_across_buckets, allow_duplicates
        self.causal = bool(causal)
        self.norm = nn.LayerNorm(channels, **dd)
        self.qkv = nn.Linear(channels, 2 * channels, bias=qkv_bias, **dd)  # shared QK, V
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        cols = rotation_columns(factor_buckets(n_buckets)) if n_buckets is not None else 64
        shape = (heads, n_hashes, self.head_dim, cols)
        self.register_buffer("rotations", seeded_normal(shape, resolve_seed(seed), **dd))

    def buckets_for(self, n_tokens: int) -> int:
        """Buckets per round for a padded sequence of ``n_tokens``."""
        if self.n_buckets is not None:
            return self.n_buckets
        return min(2 * max(1, n_tokens // self.chunk_size), MAX_BUCKETS)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        n = height * width
        m = min(self.chunk_size, n)
        n_pad = -(-n // m) * m
        nc, nb = n_pad // m, self.buckets_for(n_pad)
        qk, v = rearrange(self.qkv(self.norm(to_tokens(x))), "b n (t h d) -> t b h n d", t=2, h=self.heads)
        if n_pad > n:
            qk, v = F.pad(qk, (0, 0, 0, n_pad - n)), F.pad(v, (0, 0, 0, n_pad - n))
        pos = torch.arange(n_pad, device=x.device)

        with torch.no_grad():
            rotations = hash_draw(self.rotations, self.training)
            buckets = angular_buckets(qk, rotations, factor_buckets(nb))  # (b, h, R, n_pad)
            buckets = buckets.masked_fill(pos >= n, nb)  # padding: a bucket of its own, sorted last
            perm, inv = sort_with_inverse(buckets * n_pad + pos)
            qpos = perm.unflatten(-1, (nc, m))  # raster position of each sorted slot
            kpos = look_one_back(qpos, 3)
            sbuckets = buckets.gather(-1, perm).unflatten(-1, (nc, m))
            allowed = self._allowed(qpos, kpos, sbuckets, n)
            counts = (
                None
                if self.allow_duplicates or self.n_hashes == 1
                else self._counts(inv, buckets, qpos, m, nb)
            )

        sq = gather_tokens(qk, perm).unflatten(3, (nc, m))  # (b, h, R, nc, m, d)
        sk = look_one_back(gather_tokens(F.normalize(qk, dim=-1), perm).unflatten(3, (nc, m)), 3)
        sv = look_one_back(gather_tokens(v, perm).unflatten(3, (nc, m)), 3)
        dots = torch.einsum("...id,...jd->...ij", sq, sk)  # (b, h, R, nc, m, m or 2m)
        if counts is not None:
            dots.sub_(counts.to(dots.dtype).log_())  # log 0 = -inf only where the mask below applies
        if allowed is not None:
            dots.masked_fill_(~allowed, float("-inf"))
        # The query's own key is slot i of its own chunk, the first m keys of its window.
        dots.diagonal(dim1=-2, dim2=-1).sub_(SELF_PENALTY)
        out, lse = attend_lse(dots, sv)
        out = gather_tokens(out.flatten(3, 4), inv)  # unsort
        out = merge_rounds(out, lse.flatten(3).gather(-1, inv), dim=2)[:, :, :n]
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))
        return x + to_map(out, height, width)

    def _allowed(self, qpos, kpos, sbuckets, n: int) -> torch.Tensor | None:
        """Boolean (b, h, R, nc, m, w) mask of attendable keys (self always allowed: it is the fallback)."""
        allowed = None
        if self.causal:
            allowed = kpos.unsqueeze(-2) <= qpos.unsqueeze(-1)
        elif n < qpos.shape[-1] * qpos.shape[-2]:
            allowed = (kpos < n).unsqueeze(-2).expand(*qpos.shape, kpos.shape[-1])
        if not self.attend_across_buckets:
            same = sbuckets.unsqueeze(-1) == look_one_back(sbuckets, 3).unsqueeze(-2)
            allowed = same if allowed is None else allowed & same
        if allowed is not None:
            allowed = allowed.clone()
            allowed.diagonal(dim1=-2, dim2=-1).fill_(True)
        return allowed

    def _counts(self, inv, buckets, qpos, m: int, nb: int) -> torch.Tensor:
        """N_ij: the number of rounds in which key j lies in query i's window (and bucket), per pair."""
        nc = qpos.shape[-2]
        flat = qpos.flatten(2)
        # Per token and round a code bucket * nc + chunk (bucket 0 when buckets are ignored): key j is
        # in query i's round-r window iff code_j == code_i (same chunk) or next_j == code_i (previous
        # chunk). Small integer codes keep the pairwise passes cheap.
        span = nc if self.attend_across_buckets else (nb + 1) * nc
        small = torch.int16 if span < 2**15 else torch.int32
        chunks = (inv // m).to(small)
        codes = chunks if self.attend_across_buckets else buckets.to(small) * nc + chunks
        nexts = codes - chunks + (chunks + 1) % nc  # a key's code as seen from the following chunk
        # Byte counters: the accumulating passes are the cost here.
        count_dtype = torch.uint8 if self.n_hashes < 256 else torch.int32
        counts = torch.zeros(*qpos.shape, qpos.shape[-1] * min(nc, 2), dtype=count_dtype, device=qpos.device)
        hit = torch.empty(counts.shape, dtype=torch.bool, device=qpos.device)
        hit_bytes = hit.view(torch.uint8) if count_dtype == torch.uint8 else hit  # adds without a cast
        for r in range(self.n_hashes):
            code_q = codes[:, :, r].gather(-1, flat).view_as(qpos)
            torch.eq(code_q.unsqueeze(-1), look_one_back(code_q, 3).unsqueeze(-2), out=hit)
            counts += hit_bytes
            if nc > 1:
                code_next = nexts[:, :, r].gather(-1, flat).view_as(qpos)
                torch.eq(code_q.unsqueeze(-1), look_one_back(code_next, 3).unsqueeze(-2), out=hit)
                counts += hit_bytes
        return counts

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, heads={self.heads}, n_hashes={self.n_hashes}, "
            f"chunk_size={self.chunk_size}, n_buckets={self.n_buckets}, causal={self.causal}"
        )
