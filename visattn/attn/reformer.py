"""Reformer: The Efficient Transformer (LSH attention) — https://arxiv.org/abs/2001.04451

Sequence method on the flattened map (raster order), content-based, so no positional code is added:
pre-norm tokens, shared-QK heads hashed by angular LSH, sorted by (bucket, position), cut into chunks
of m tokens that attend to themselves and the previous chunk, n_hashes rounds merged by logsumexp.
H*W is padded to a multiple of m; padded tokens sort last and are never attended. Causal attention
chunks each bucket on its own (see ``Reformer``), so that no future token can move a chunk boundary.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import AttnBlock, accuracy_dtype, factory_kwargs, resolve_heads, to_map, to_tokens
from ..layers.compat import is_exporting
from ..layers.hashing import (
    angular_buckets,
    attend_lse,
    factor_buckets,
    gather_tokens,
    hash_draw,
    look_back,
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
    export_dynamic_hw=False,
    export_note="the bucket count and chunk size follow H*W and are fixed at export",
    idea="shared-QK attention within angular-LSH buckets: sort by hash, attend within chunk + previous chunk",
    reference="https://github.com/google/trax/tree/master/trax/models/reformer",
    random_in_training=True,  # fresh hash rotations every call
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

    Causal attention (``causal=True``) cannot use the paper's chunks as they are: a chunk boundary in
    the sorted order moves with the number of tokens in lower buckets, future tokens included, so the
    past keys a query sees would depend on the future (reformer-pytorch and trax have this leak). Here
    causal chunks are cut within each bucket: a query sees the earlier keys of its own bucket whose
    rank in the bucket (raster order) falls in its own or the previous block of m ranks. That set is
    fixed by the earlier tokens alone, so outputs are exactly causal, in value as well as in gradient.
    It is the paper's scheme with ``attend_across_buckets=False`` and bucket-aligned chunks.

    Args:
        channels: input channels C.
        heads: attention heads (default: heads of 32 channels, ``default_heads``).
        n_hashes: hashing rounds (paper: 1-8; 8 matches full attention in its experiments).
        chunk_size: chunk length m (paper: 64); maps with fewer tokens use one chunk of all of them.
        n_buckets: buckets per round, 1 or even. None: 2 * (padded tokens // m) as in trax (the
            paper's m = 2N / n_buckets), capped at 4096; above 128 buckets the hash is factorised.
        attend_across_buckets: attend to every key of the two chunks (the paper's chunked scheme
            and the authors' trax runs; the default without ``causal``) or only to those of the
            query's bucket. Causal attention needs False (its default then), see above.
        allow_duplicates: skip the de-duplication over rounds (reformer-pytorch's default; on CPU the
            de-duplication adds about a quarter to forward+backward at 96x96, C=64).
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
        attend_across_buckets: bool | None = None,
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
        if attend_across_buckets is None:
            attend_across_buckets = not causal
        elif causal and attend_across_buckets:
            raise ValueError(
                "reformer: causal attention cannot attend across buckets (future tokens would move the "
                "chunk boundaries); use attend_across_buckets=False or leave it None"
            )
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
        # Chunks before the query's that hold keys: the previous one, or two for causal bucket-aligned
        # chunks (a query's window of ranks starts up to 2m - 1 sorted slots before it).
        back = min(2 if self.causal else 1, nc - 1)
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
            kpos = look_back(qpos, 3, back)  # raster position of each key of each chunk's window
            # log N_ij in at least float32 (half types round log 2 and log 3), and in float64 for float64.
            acc = accuracy_dtype(qk.dtype)
            if torch.compiler.is_compiling() and not is_exporting():
                penalty = _penalty_op(buckets, inv, qpos, kpos, m, nb, back, n, acc, *self._penalty_flags())
            else:
                penalty = self._penalty(buckets, inv, qpos, kpos, m, nb, back, n, acc)

        sq = gather_tokens(qk, perm).unflatten(3, (nc, m))  # (b, h, R, nc, m, d)
        # The padding keys are zero vectors: F.normalize's default eps (1e-12) is 0 in float16, giving 0/0.
        eps = max(1e-12, torch.finfo(qk.dtype).tiny)
        # Sorted once, then each window built from whole chunks: an index_select straight from kpos
        # would double the rows of its backward's index_add, which costs more than the chunk copies.
        sk = look_back(gather_tokens(F.normalize(qk, dim=-1, eps=eps), perm).unflatten(3, (nc, m)), 3, back)
        sv = look_back(gather_tokens(v, perm).unflatten(3, (nc, m)), 3, back)  # (b, h, R, nc, w, d)
        if torch.finfo(qk.dtype).max < 2 * SELF_PENALTY:
            # float16 has no 1e5: saturate the finite penalties (inf stays inf), else a query whose
            # only key is its own gets a row of -inf and a NaN output.
            penalty = torch.where(penalty.isinf(), penalty, penalty.clamp_max(torch.finfo(qk.dtype).max / 2))
        # logits - penalty in the matmul's epilogue (beta = -1): no separate pass over the logits. A full
        # penalty buffer becomes the logits in place: a fresh buffer of that size costs page faults on CPU.
        w = kpos.shape[-1]
        penalty = penalty.to(qk.dtype)
        args = (sq.flatten(0, -3), sk.flatten(0, -3).transpose(-1, -2))
        if penalty.dim() == 3:  # (b * h * R * nc, m, w), a buffer of its own (not a view)
            dots = penalty.baddbmm_(*args, beta=-1)
        else:
            dots = torch.baddbmm(penalty.expand(*sq.shape[:-2], m, w).flatten(0, -3), *args, beta=-1)
        dots = dots.view(*sq.shape[:-2], m, w)  # (b, h, R, nc, m, w)
        out, lse = attend_lse(dots, sv)
        out = gather_tokens(out.flatten(3, 4), inv)  # unsort
        out = merge_rounds(out, lse.flatten(3).gather(-1, inv), dim=2)[:, :, :n]
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))
        return x + to_map(out, height, width)

    def _penalty_flags(self) -> tuple[bool, bool, bool, int]:
        return self.causal, self.attend_across_buckets, self.allow_duplicates, self.n_hashes

    def _penalty(
        self, buckets, inv, qpos, kpos, m: int, nb: int, back: int, n: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """What to subtract from the logits, (b * h * R * nc, m, w) or a broadcastable (m, w), in ``dtype``:
        inf for keys outside the window, masked or padded; log N_ij for the rounds' de-duplication; 1e5 on
        the query's own key (slot i of its own chunk, the first m keys of its window)."""
        w = kpos.shape[-1]
        shape = (*qpos.shape, w)  # (b, h, R, nc, m, w)
        dedup = not (self.allow_duplicates or self.n_hashes == 1)
        # The paper's chunked window with nothing to mask (no padding, across buckets, not causal) needs
        # no code comparison: every key of the two chunks is allowed.
        masked = self.causal or not self.attend_across_buckets or buckets.shape[-1] > n
        # Exporters need a functional graph (no in-place writes through views).
        exporting = is_exporting()
        if dedup or masked:
            codes, nexts = self._codes(buckets, inv, m, nb)
        if dedup:
            counts = self._counts(codes, nexts, qpos, back)
            if exporting:
                penalty = counts.to(dtype).log().view(-1, m, w)
            else:  # into a buffer of its own (the logits later), then the log in place
                penalty = torch.empty(math.prod(shape[:-2]), m, w, device=counts.device, dtype=dtype)
                penalty.view(shape).copy_(counts)
                penalty.log_()
        elif masked:
            penalty = torch.zeros(math.prod(shape[:-2]), m, w, device=qpos.device, dtype=dtype)
        else:
            penalty = torch.zeros(m, w, device=qpos.device, dtype=dtype)
        if masked:
            allowed = (kpos < n).unsqueeze(-2)
            if self.causal:
                allowed = allowed & (kpos.unsqueeze(-2) <= qpos.unsqueeze(-1))
            if self.causal or not self.attend_across_buckets:
                # Codes of round r at the sorted slots of round r.
                scodes, snexts = (c.gather(-1, qpos.flatten(-2)).view_as(qpos) for c in (codes, nexts))
                q = scodes.unsqueeze(-1)
                kcodes, knexts = look_back(scodes, 3, back), look_back(snexts, 3, back)
                allowed = allowed & ((q == kcodes.unsqueeze(-2)) | (q == knexts.unsqueeze(-2)))
            # The own key stays allowed (at 1e5): it is the last resort of a query with nothing else.
            own = torch.eye(m, w, dtype=torch.bool, device=qpos.device)
            excluded = ~(allowed | own)
            if exporting:
                penalty = penalty.view(shape).masked_fill(excluded, float("inf")).view(-1, m, w)
            else:
                penalty.view(shape).masked_fill_(excluded, float("inf"))
        if is_exporting():  # the ONNX decomposition needs a functional graph
            return penalty + SELF_PENALTY * torch.eye(m, w, device=qpos.device, dtype=dtype)
        # In place on the (m, w) diagonal of every chunk: m entries, not a pass over all logits.
        penalty.diagonal(dim1=-2, dim2=-1).add_(SELF_PENALTY)
        return penalty

    def _codes(self, buckets: torch.Tensor, inv: torch.Tensor, m: int, nb: int):
        """Per token and round, small int ``codes`` and ``nexts`` such that key j is in query i's window
        iff ``code_j == code_i`` (same chunk) or ``next_j == code_i`` (j in the chunk before i's, circularly
        without ``causal``). Codes of different buckets are at least ``blocks`` apart."""
        n_pad = buckets.shape[-1]
        blocks = n_pad // m + 2
        chunks = inv // m
        if self.causal:  # (bucket, rank in the bucket // m): rank = sorted slot - first slot of the bucket
            sizes = torch.zeros(*buckets.shape[:-1], nb + 1, dtype=torch.long, device=buckets.device)
            sizes = sizes.scatter_add(-1, buckets, torch.ones_like(buckets))
            first = sizes.cumsum(-1) - sizes
            codes = buckets * blocks + (inv - first.gather(-1, buckets)) // m
            nexts = codes + 1
        else:
            nc = n_pad // m
            codes = chunks if self.attend_across_buckets else buckets * blocks + chunks
            nexts = codes - chunks + torch.where(chunks + 1 == nc, 0, chunks + 1)  # (chunks + 1) % nc
        # Small integer codes keep the pairwise passes (the cost of de-duplication) cheap; bytes where
        # they fit (the chunk ids of the paper's window), which also hold the per-pair round counts.
        bound = blocks if not self.causal and self.attend_across_buckets else (nb + 2) * blocks
        if bound <= 256 and self.n_hashes < 256:
            small = torch.uint8
        else:
            small = torch.int16 if bound < 2**15 and self.n_hashes < 2**15 else torch.int32
        return codes.to(small), nexts.to(small)

    def _counts(
        self, codes: torch.Tensor, nexts: torch.Tensor, qpos: torch.Tensor, back: int
    ) -> torch.Tensor:
        """N_ij: the number of rounds in which key j lies in query i's window, per (query, key) slot,
        exact for the keys the window allows (the others are masked, and hold any count >= 1)."""
        rounds, w = qpos.shape[2], qpos.shape[-1] * (back + 1)
        # Counters in the codes' dtype (bytes for the paper's window). Every allowed key is in the window
        # of the round that placed it there, and can be in every other round's: start at n_hashes and
        # subtract the other rounds' misses (no comparison for the own round).
        counts = torch.full((*qpos.shape, w), rounds, dtype=codes.dtype, device=qpos.device)
        # A comparison writes bools, several times slower on CPU than an xor, min or clamp that keeps the
        # dtype: key j misses query i in round r iff both code_q ^ code_j and code_q ^ next_j are non-zero.
        miss, other = torch.empty_like(counts), torch.empty_like(counts)
        # Reused buffers in eager; compilers and exporters take no strided ``out=``, and allocate.
        eager = not (torch.compiler.is_compiling() or is_exporting())
        for r in range(self.n_hashes):
            code_r, next_r = codes[:, :, r], nexts[:, :, r]
            for lo, hi in ((0, r), (r + 1, rounds)):
                if lo == hi:
                    continue
                # Round r's codes at the sorted slots of rounds lo..hi-1.
                where = qpos[:, :, lo:hi]
                code_q = code_r.gather(-1, where.flatten(2)).view_as(where)
                out = miss[:, :, lo:hi] if eager else None
                keys = look_back(code_q, 3, back).unsqueeze(-2)
                out = torch.bitwise_xor(code_q.unsqueeze(-1), keys, out=out)
                if back:
                    code_next = next_r.gather(-1, where.flatten(2)).view_as(where)
                    keys = look_back(code_next, 3, back).unsqueeze(-2)
                    xor_next = torch.bitwise_xor(
                        code_q.unsqueeze(-1), keys, out=other[:, :, lo:hi] if eager else None
                    )
                    out = torch.minimum(out, xor_next, out=out if eager else None)
                counts[:, :, lo:hi] -= out.clamp_max_(1)
        return counts

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, heads={self.heads}, n_hashes={self.n_hashes}, "
            f"chunk_size={self.chunk_size}, n_buckets={self.n_buckets}, causal={self.causal}"
        )


class _PenaltySpec:
    """The settings :meth:`Reformer._penalty` reads and the methods it calls, without a module (for
    :func:`_penalty_op`, whose arguments are tensors and plain values)."""

    _penalty, _codes, _counts = Reformer._penalty, Reformer._codes, Reformer._counts

    def __init__(self, causal: bool, attend_across_buckets: bool, allow_duplicates: bool, n_hashes: int):
        self.causal, self.attend_across_buckets = causal, attend_across_buckets
        self.allow_duplicates, self.n_hashes = allow_duplicates, n_hashes


# Under torch.compile the penalty (integer de-duplication counts and masks, no gradient) runs as one opaque
# call of the eager code: inductor inlines its gathers and look-back index_selects into the pairwise
# (query, key, round) loop as scalar indirect loads with int64 div/mod and bounds checks, recomputed for
# every logit and round, which made the compiled forward+backward about 6.7x slower than eager at 64x64.
@torch.library.custom_op("visattn::reformer_penalty", mutates_args=())
def _penalty_op(
    buckets: torch.Tensor,
    inv: torch.Tensor,
    qpos: torch.Tensor,
    kpos: torch.Tensor,
    m: int,
    nb: int,
    back: int,
    n: int,
    dtype: torch.dtype,
    causal: bool,
    attend_across_buckets: bool,
    allow_duplicates: bool,
    n_hashes: int,
) -> torch.Tensor:
    """:meth:`Reformer._penalty` as a custom op (see above); its output is a fresh tensor."""
    spec = _PenaltySpec(causal, attend_across_buckets, allow_duplicates, n_hashes)
    return spec._penalty(buckets, inv, qpos, kpos, m, nb, back, n, dtype)


@_penalty_op.register_fake
def _penalty_fake(
    buckets, inv, qpos, kpos, m, nb, back, n, dtype, causal, attend_across_buckets, allow_duplicates, n_hashes
):
    dedup = not (allow_duplicates or n_hashes == 1)
    masked = causal or not attend_across_buckets or buckets.shape[-1] > n
    w = kpos.shape[-1]
    if dedup or masked:
        return qpos.new_empty((math.prod(qpos.shape[:-1]), m, w), dtype=dtype)
    return qpos.new_empty((m, w), dtype=dtype)
