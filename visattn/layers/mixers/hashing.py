"""Hashing mixer cores (SMYRF's asymmetric LSH clusters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..hashing import (
    attend_lse,
    e2lsh_project,
    gather_tokens,
    merge_rounds,
    seeded_normal,
    seeded_uniform,
    sort_with_inverse,
    stable_argsort,
    xbox_plus,
)
from ..padding import ceil_div
from .base import MixerCore

__all__ = ["SmyrfCore"]


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
