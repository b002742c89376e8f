"""Fast Transformers with Clustered Attention — https://arxiv.org/abs/2007.04825

Sequence method on the flattened map (raster order): pre-norm tokens; per sample and head the queries
are hashed by random hyperplanes and clustered by Lloyd iterations in Hamming space; each cluster's
mean query attends to all keys and its output is broadcast to the members. The improved variant
recomputes every query's attention exactly on its cluster's top-k keys. No padding is needed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import AttnBlock, factory_kwargs, resolve_heads, to_map, to_tokens
from ..layers.hashing import gather_tokens, hash_draw, resolve_seed, seeded_normal
from ..registry import register_attn


def hyperplane_codes(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """±1 codes sign(x·w_b + c_b) of ``x`` (..., N, d) for ``planes`` (..., d + 1, bits) (last row: offsets)."""
    proj = x @ planes[..., :-1, :].to(x.dtype) + planes[..., -1:, :].to(x.dtype)
    return torch.where(proj > 0, 1.0, -1.0).to(torch.float32)


def hamming_kmeans(codes: torch.Tensor, n_clusters: int, iterations: int) -> torch.Tensor:
    """Lloyd's algorithm in Hamming space on ±1 ``codes`` (..., N, bits) -> (..., N) cluster ids.

    Centroids start at the codes of ``n_clusters`` evenly spaced tokens (the reference takes the
    first K, which on a raster map are the top rows); ``iterations`` assignments with a majority-vote
    centroid update between them, as in the reference. Empty clusters keep their centroid (the
    reference redraws them at random, which would make eval stochastic). Ties go to the lowest id.
    """
    n = codes.shape[-2]
    start = torch.arange(n_clusters, device=codes.device) * n // n_clusters
    centroids = codes[..., start, :]
    for it in range(iterations):
        # Hamming distance = (bits - <code, centroid>) / 2 for ±1 vectors: nearest = largest dot.
        assign = (codes @ centroids.transpose(-1, -2)).argmax(dim=-1)
        if it == iterations - 1:
            break
        index = assign.unsqueeze(-1).expand_as(codes)
        votes = torch.zeros_like(centroids).scatter_add_(-2, index, codes)
        members = torch.zeros_like(centroids[..., :1]).scatter_add_(
            -2, index[..., :1], torch.ones_like(codes[..., :1])
        )
        centroids = torch.where(members > 0, torch.where(votes > 0, 1.0, -1.0), centroids)
    return assign


@register_attn(
    "clustered",
    title="Fast Transformers with Clustered Attention",
    arxiv="2007.04825",
    year=2020,
    family="clustering",
    complexity="O(N·k·D)",
    flops_exponent=1.0,
    native_2d=False,
    causal=False,
    identity_init=True,
    idea="queries grouped by LSH + Hamming k-means; centroid attention broadcast, improved with exact top-k per cluster",
    reference="https://github.com/idiap/fast-transformers",
)
class Clustered(AttnBlock):
    """(Improved-)clustered attention, ``x + proj(attn(LayerNorm(x)))`` with a zero-initialised projection.

    Clustered: A_c = softmax(Q_c Kᵀ/√d) for the mean query Q_c of each cluster, output A_c V for
    every member. Improved: the cluster's top-k keys under Q_c get each member's exact softmax over
    them, scaled by the centroid's mass on those keys; the other keys keep the centroid weights.
    Hyperplanes are buffers drawn from a seeded generator (deterministic, batch-independent eval),
    redrawn at every training call as in the reference. Clusters are capped at the number of tokens.

    Args:
        channels: input channels C.
        heads: attention heads (default: heads of 32 channels, ``default_heads``).
        clusters: query clusters C (paper: 100).
        iterations: Lloyd iterations (paper: 10).
        bits: hash bits B (paper: 32).
        hash_bias: random offsets on the hyperplanes (Hamming distance tracks L2 rather than angle).
        improved: the improved variant with exact attention on the top-k keys (i-clustered).
        topk: keys per cluster recomputed exactly (paper: 32).
        qkv_bias: bias of the q/k/v projections.
        seed: seed of the hyperplanes (None: drawn from the global RNG at construction).
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        clusters: int = 100,
        iterations: int = 10,
        bits: int = 32,
        hash_bias: bool = True,
        improved: bool = True,
        topk: int = 32,
        qkv_bias: bool = True,
        seed: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        heads = resolve_heads(channels, heads, "clustered")
        for name, value in (
            ("clusters", clusters),
            ("iterations", iterations),
            ("bits", bits),
            ("topk", topk),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"clustered: {name} must be a positive int, got {value!r}")
        dd = factory_kwargs(device, dtype)
        self.heads, self.head_dim = heads, channels // heads
        self.clusters, self.iterations, self.bits = clusters, iterations, bits
        self.hash_bias, self.improved, self.topk = bool(hash_bias), bool(improved), topk
        self.norm = nn.LayerNorm(channels, **dd)
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        planes = seeded_normal((heads, self.head_dim + 1, bits), resolve_seed(seed), **dd)
        if not hash_bias:
            planes[:, -1] = 0
        self.register_buffer("planes", planes)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        n = height * width
        q, k, v = rearrange(self.qkv(self.norm(to_tokens(x))), "b n (t h d) -> t b h n d", t=3, h=self.heads)
        scale = self.head_dim**-0.5
        n_clusters = min(self.clusters, n)

        with torch.no_grad():
            planes = hash_draw(self.planes, self.training)
            if not self.hash_bias:
                planes = torch.cat([planes[:, :-1], torch.zeros_like(planes[:, -1:])], dim=1)
            assign = hamming_kmeans(hyperplane_codes(q, planes), n_clusters, self.iterations)  # (b, h, n)
            index = assign.unsqueeze(-1)
            members = torch.zeros(*assign.shape[:-1], n_clusters, 1, device=x.device, dtype=q.dtype)
            members = members.scatter_add_(-2, index, torch.ones_like(q[..., :1])).clamp_min_(1)

        centroids = torch.zeros(*q.shape[:-2], n_clusters, q.shape[-1], device=x.device, dtype=q.dtype)
        centroids = centroids.scatter_add(-2, index.expand_as(q), q) / members  # mean query per cluster
        if self.improved:
            out = self._improved(q, k, v, centroids, assign, scale)
        else:  # the centroid's output, broadcast to its members
            out = gather_tokens(F.scaled_dot_product_attention(centroids, k, v), assign)
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))
        return x + to_map(out, height, width)

    def _improved(self, q, k, v, centroids, assign, scale: float) -> torch.Tensor:
        """Exact softmax of each query over its cluster's top-k keys, centroid weights elsewhere."""
        scores = centroids @ k.transpose(-1, -2) * scale  # (b, h, C, n)
        attn = scores.softmax(dim=-1)
        top = scores.topk(min(self.topk, k.shape[-2]), dim=-1).indices  # (b, h, C, topk)
        mass = attn.gather(-1, top).sum(-1, keepdim=True)  # centroid mass on the top-k keys
        rest = attn.scatter(-1, top, 0.0) @ v  # (b, h, C, d): centroid attention on the other keys
        member_top = gather_tokens(top, assign)  # (b, h, n, topk): the top-k of each query's cluster
        k_top, v_top = gather_tokens(k, member_top), gather_tokens(v, member_top)  # (b, h, n, topk, d)
        # One query per softmax: batched dot products (about 3x faster than SDPA's kernels on CPU).
        exact = torch.einsum("bhnd,bhnkd->bhnk", q, k_top).mul_(scale).softmax(dim=-1)
        exact = torch.einsum("bhnk,bhnkd->bhnd", exact, v_top)
        return gather_tokens(mass, assign) * exact + gather_tokens(rest, assign)
