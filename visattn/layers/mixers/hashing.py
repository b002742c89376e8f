"""Hashing mixer cores: SMYRF's asymmetric LSH clusters, Reformer's angular LSH chunks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..hashing import (
    angular_buckets,
    attend_lse,
    e2lsh_project,
    factor_buckets,
    gather_tokens,
    hash_draw,
    look_one_back,
    merge_rounds,
    rotation_columns,
    seeded_normal,
    seeded_uniform,
    sort_with_inverse,
    stable_argsort,
    xbox_plus,
)
from ..padding import ceil_div
from ..precision import accuracy_dtype
from .base import BlockHolder, MixerCore

__all__ = ["SmyrfCore", "ReformerCore"]


class SmyrfCore(MixerCore):
    """SMYRF: per head and round, XBOX+ transforms of the patch q and k, E2LSH values sorted and cut into
    clusters of ``cluster_size``; each query cluster attends its key cluster plus the prefix keys, rounds
    merged by logsumexp. Hash parameters are non-persistent buffers drawn from ``seed``. Dense limit:
    ``cluster_size >= H*W`` (one cluster)."""

    def __init__(self, dim: int, heads: int, *, n_hashes: int = 4, cluster_size: int = 32,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(dim, heads)
        for name, value in (("n_hashes", n_hashes), ("cluster_size", cluster_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"smyrf (ViT mixer): {name} must be a positive int, got {value!r}")
        self.n_hashes, self.cluster_size = n_hashes, cluster_size
        self.register_buffer(
            "alpha", seeded_normal((heads, self.head_dim + 2, n_hashes), seed), persistent=False
        )
        self.register_buffer("beta", seeded_uniform((heads, 1, n_hashes), seed + 1), persistent=False)

    def patches(self, q, k, v, grid, prefix):
        qp, kp, vp = q[:, :, prefix:], k[:, :, prefix:], v[:, :, prefix:]
        n = qp.shape[2]
        c = min(self.cluster_size, n)
        n_pad = ceil_div(n, c) * c
        if n_pad > n:
            qp, kp, vp = (F.pad(t, (0, 0, 0, n_pad - n)) for t in (qp, kp, vp))
        valid = torch.arange(n_pad, device=q.device) < n
        with torch.no_grad():
            fq, gk = xbox_plus(qp, kp, valid)
            hq = e2lsh_project(fq, self.alpha, self.beta).masked_fill(~valid, float("inf"))
            hk = e2lsh_project(gk, self.alpha, self.beta).masked_fill(~valid, float("inf"))
            q_perm, q_inv = sort_with_inverse(hq)
            k_perm = stable_argsort(hk)
            key_ok = (k_perm < n).unflatten(-1, (-1, c)).unsqueeze(-2)
        scale = q.shape[-1] ** -0.5
        sq = gather_tokens(qp * scale, q_perm).unflatten(3, (-1, c))  # (b, h, R, clusters, c, d)
        sk = gather_tokens(kp, k_perm).unflatten(3, (-1, c))
        sv = gather_tokens(vp, k_perm).unflatten(3, (-1, c))
        dots = torch.einsum("...id,...jd->...ij", sq, sk).masked_fill(~key_ok, float("-inf"))
        if prefix:
            pre = torch.einsum("bhrgid,bhjd->bhrgij", sq, k[:, :, :prefix])
            dots = torch.cat([dots, pre], dim=-1)
            vpre = v[:, :, :prefix, None, None].movedim(2, 4).expand(*sv.shape[:4], prefix, sv.shape[-1])
            sv = torch.cat([sv, vpre], dim=-2)
        out, lse = attend_lse(dots, sv)
        out = gather_tokens(out.flatten(3, 4), q_inv)
        return merge_rounds(out, lse.flatten(3).gather(-1, q_inv), dim=2)[:, :, :n]


class ReformerCore(MixerCore):
    """Reformer's LSH attention over a ViT's separate q and k. Reformer shares QK so that a token's query
    and key fall in one bucket; a pretrained ViT has distinct q and k, and tying them would change the
    pretrained function. So, per head and round, the patch queries and the patch keys are hashed by the same
    random rotation (angular LSH, the block's bucket rule and factorisation), each sorted by (bucket,
    position) and cut into ``nc`` chunks of m = ``chunk_size``; query chunk c attends key chunks c and
    c - 1 (circularly, as the paper's chunks) and the prefix keys. The two Reformer devices that exist only
    because of shared QK are dropped: keys are not normalised (q·k stays the pretrained dot product) and a
    token may attend to itself. Rounds merge by logsumexp with the paper's de-duplication (logit - log N_ij,
    N_ij the rounds in which key j meets query i; ``allow_duplicates=True`` skips it). Rotations: a
    non-persistent buffer from ``seed``, redrawn per training call as the paper rehashes. Dense limit:
    ``n_buckets=1`` with ``chunk_size >= H*W``."""

    def __init__(self, dim: int, heads: int, *, n_hashes: int = 8, chunk_size: int = 64,
                 n_buckets: int | None = None, allow_duplicates: bool = False, seed: int = 0) -> None:  # fmt: skip
        super().__init__(dim, heads)
        self.holder = BlockHolder(
            "reformer", n_hashes=n_hashes, chunk_size=chunk_size, n_buckets=n_buckets,
            allow_duplicates=allow_duplicates, seed=seed,
        )  # fmt: skip
        cols = rotation_columns(factor_buckets(n_buckets)) if n_buckets is not None else 64
        rotations = seeded_normal((heads, n_hashes, self.head_dim, cols), seed)
        self.register_buffer("rotations", rotations, persistent=False)
        self.n_hashes, self.dedup = n_hashes, not allow_duplicates and n_hashes > 1

    def patches(self, q, k, v, grid, prefix):
        block = self.holder.get(q.device, self.training)
        qp, kp, vp = q[:, :, prefix:], k[:, :, prefix:], v[:, :, prefix:]
        n = qp.shape[2]
        m = min(block.chunk_size, n)
        n_pad = ceil_div(n, m) * m
        nc, nb = n_pad // m, block.buckets_for(n_pad)
        if n_pad > n:
            qp, kp, vp = (F.pad(t, (0, 0, 0, n_pad - n)) for t in (qp, kp, vp))
        pos = torch.arange(n_pad, device=q.device)
        with torch.no_grad():
            rotations = hash_draw(self.rotations, self.training)
            factors = factor_buckets(nb)
            # Padding: a bucket of its own, sorted last; never a key.
            bq = angular_buckets(qp, rotations, factors).masked_fill(pos >= n, nb)
            bk = angular_buckets(kp, rotations, factors).masked_fill(pos >= n, nb)
            q_perm, q_inv = sort_with_inverse(bq * n_pad + pos)
            k_perm, k_inv = sort_with_inverse(bk * n_pad + pos)
            kpos = look_one_back(k_perm.unflatten(-1, (nc, m)), 3)  # (b, h, R, nc, w)
            # log N_ij in at least float32 (half types round log 2 and log 3), and in float64 for float64.
            acc = accuracy_dtype(q.dtype)
            bias = torch.zeros(kpos.shape, device=q.device, dtype=acc).masked_fill(kpos >= n, float("-inf"))
            bias = bias.unsqueeze(-2)
            if self.dedup:
                bias = bias - self._counts(q_perm, q_inv, k_inv, kpos, m, nc, acc).log_()
        scale = q.shape[-1] ** -0.5
        sq = gather_tokens(qp * scale, q_perm).unflatten(3, (nc, m))  # (b, h, R, nc, m, d)
        sk = look_one_back(gather_tokens(kp, k_perm).unflatten(3, (nc, m)), 3)
        sv = look_one_back(gather_tokens(vp, k_perm).unflatten(3, (nc, m)), 3)
        dots = sq @ sk.transpose(-1, -2) + bias.to(sq.dtype)
        if prefix:
            # The prefix keys are in every round's key set: seen n_hashes times, counted once.
            pre = torch.einsum("bhrgid,bhjd->bhrgij", sq, k[:, :, :prefix])
            dots = torch.cat([dots, pre - math.log(self.n_hashes) if self.dedup else pre], dim=-1)
            vpre = v[:, :, :prefix, None, None].movedim(2, 4).expand(*sv.shape[:4], prefix, sv.shape[-1])
            sv = torch.cat([sv, vpre], dim=-2)
        out, lse = attend_lse(dots, sv)
        out = gather_tokens(out.flatten(3, 4), q_inv)
        return merge_rounds(out, lse.flatten(3).gather(-1, q_inv), dim=2)[:, :, :n]

    def _counts(
        self, q_perm, q_inv, k_inv, kpos, m: int, nc: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """N_ij per (query, key) slot, in ``dtype``: the rounds in which key j lies in query i's two chunks
        (>= 1)."""
        rounds = q_perm.shape[2]
        # Chunk ids and counters in bytes where they fit; a comparison writes bools, several times slower
        # on CPU than xor / min / clamp in one dtype: key j misses query i in round r iff its chunk differs
        # from both the query's chunk and the one before it, i.e. both xors are non-zero.
        small = torch.uint8 if nc <= 256 and rounds < 256 else torch.int32
        q_chunk, k_chunk = (q_inv // m).to(small), (k_inv // m).to(small)
        counts = torch.full((*kpos.shape[:-1], m, kpos.shape[-1]), rounds, dtype=small, device=kpos.device)
        for r in range(rounds):
            qc = q_chunk[:, :, r].gather(-1, q_perm.flatten(2)).view(*kpos.shape[:-1], m, 1)
            prev = torch.where(qc == 0, nc - 1, qc - 1)  # (qc - 1) % nc without wrapping the byte
            kc = k_chunk[:, :, r].gather(-1, kpos.flatten(2)).view_as(kpos).unsqueeze(-2)
            counts -= torch.minimum(qc ^ kc, prev ^ kc).clamp_max_(1)
        return counts.clamp_min_(1).to(dtype)
