"""Mixer cores that choose by content which queries or keys are attended exactly: Informer's ProbSparse
active queries, SCRAM's PatchMatch key sets, clustered attention's query clusters. Each reuses its block's
own selection (budget, sampler, PatchMatch search, Hamming k-means, the improved-clustered product)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..gather_attention import gather_attend
from ..hashing import gather_tokens, hash_draw, seeded_normal
from ..precision import upcast_for_accuracy
from .base import BlockHolder, MixerCore

__all__ = ["InformerCore", "ScramCore", "ClusteredCore"]


class InformerCore(MixerCore):
    """ProbSparse attention (Informer) for the patch queries: U = c·ceil(ln N) keys of all N tokens are
    sampled (the block's counter hash of ``seed`` in eval, a fresh draw in training, as the paper), the
    u = U patch queries with the largest max-minus-mean score on them attend every token exactly, the
    other ("lazy") patch queries output mean(V) over all tokens (uniform weights: the prefix keys are in
    it). Dense limit: ``factor`` large enough that u >= H*W (every patch query is active)."""

    def __init__(self, dim: int, heads: int, *, factor: int = 5, seed: int = 0) -> None:
        super().__init__(dim, heads)
        self.holder = BlockHolder("informer", factor=factor, seed=seed)

    def patches(self, q, k, v, grid, prefix):
        from ...attn.informer import hashed_uniform

        block = self.holder.get(q.device, self.training)
        qp = q[:, :, prefix:]
        b, h, n, d = k.shape
        u = block.budget(n)
        with torch.no_grad():
            noise = (
                torch.rand(h, n, device=q.device)
                if self.training
                else hashed_uniform(n, block.seed, h, q.device)
            )
            sample = noise.topk(u, dim=-1).indices
            k_s = k.gather(2, sample.view(1, h, u, 1).expand(b, -1, -1, d))
            scores = upcast_for_accuracy(qp @ k_s.transpose(-1, -2))
            measure = scores.amax(-1) - scores.mean(-1)
            active = measure.topk(min(u, qp.shape[2]), dim=-1).indices.sort(-1).values
        index = active.unsqueeze(-1).expand(-1, -1, -1, d)
        out_top = F.scaled_dot_product_attention(qp.gather(2, index), k, v)
        lazy = v.mean(2, keepdim=True).expand(-1, -1, qp.shape[2], -1)
        return lazy.scatter(2, index, out_top)


class ScramCore(MixerCore):
    """SCRAM: the block's PatchMatch (:meth:`visattn.attn.scram.SCRAM.patchmatch`) finds each patch query's
    ``k`` best patch keys on the 2D grid (random init, propagation, random search; the block's counter hash
    of ``seed`` in eval, redrawn in training); softmax over those keys and the prefix keys. Dense limit:
    ``k >= H*W`` (the initial list already holds every key)."""

    def __init__(self, dim: int, heads: int, *, k: int = 16, iterations: int = 4, seed: int = 0) -> None:
        super().__init__(dim, heads)
        self.holder = BlockHolder("scram", k=k, iterations=iterations, seed=seed)

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        block = self.holder.get(q.device, self.training)
        qp = q[:, :, prefix:]
        index = block.patchmatch(qp, k[:, :, prefix:], height, width) + prefix
        if prefix:
            pre = torch.arange(prefix, device=q.device).expand(*index.shape[:-1], prefix)
            index = torch.cat([pre, index], dim=-1)
        return gather_attend(qp, k, v, index)


class ClusteredCore(MixerCore):
    """(Improved-)clustered attention: per sample and head the patch queries are hashed by ``bits`` random
    hyperplanes and clustered by Lloyd iterations in Hamming space (the block's
    :func:`visattn.attn.clustered.hamming_kmeans`); each cluster's mean query attends every token (prefix
    included). Improved: every query attends its cluster's top-k keys exactly (the block's own
    ``_improved``). Hyperplanes: a non-persistent buffer from ``seed``, redrawn per training call as the
    reference. Dense limit: ``improved=True`` with ``topk >= N`` tokens."""

    def __init__(self, dim: int, heads: int, *, clusters: int = 100, iterations: int = 10, bits: int = 32,
                 hash_bias: bool = True, improved: bool = True, topk: int = 32, seed: int = 0) -> None:  # fmt: skip
        super().__init__(dim, heads)
        self.holder = BlockHolder(
            "clustered", clusters=clusters, iterations=iterations, bits=bits, hash_bias=hash_bias,
            improved=improved, topk=topk, seed=seed,
        )  # fmt: skip
        planes = seeded_normal((heads, self.head_dim + 1, bits), seed)
        if not hash_bias:
            planes[:, -1] = 0
        self.register_buffer("planes", planes, persistent=False)

    def patches(self, q, k, v, grid, prefix):
        from ...attn.clustered import Clustered, hamming_kmeans, hyperplane_codes

        block = self.holder.get(q.device, self.training)
        qp = q[:, :, prefix:]
        n = qp.shape[2]
        n_clusters = min(block.clusters, n)
        with torch.no_grad():
            planes = hash_draw(self.planes, self.training)
            if not block.hash_bias:
                planes = torch.cat([planes[:, :-1], torch.zeros_like(planes[:, -1:])], dim=1)
            assign = hamming_kmeans(hyperplane_codes(qp, planes), n_clusters, block.iterations)
            index = assign.unsqueeze(-1)
            members = qp.new_zeros(*assign.shape[:-1], n_clusters, 1)
            members = members.scatter_add_(-2, index, torch.ones_like(qp[..., :1])).clamp_min_(1)
        centroids = qp.new_zeros(*qp.shape[:-2], n_clusters, qp.shape[-1])
        centroids = centroids.scatter_add(-2, index.expand_as(qp), qp) / members
        if block.improved:
            return Clustered._improved(block, qp, k, v, centroids, assign, self.head_dim**-0.5)
        return gather_tokens(F.scaled_dot_product_attention(centroids, k, v), assign)
