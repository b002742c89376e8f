"""SMYRF: Efficient Attention using Asymmetric Clustering — https://arxiv.org/abs/2010.05315

Sequence method on the flattened map (raster order), as SMYRF-BigGAN attends its feature maps: pre-norm
tokens, per head XBOX+ transforms of queries and keys, E2LSH values sorted and cut into equal-size
clusters (balanced, per sample), dense attention within each query/key cluster pair, rounds merged
by logsumexp. H*W is padded to the cluster size; padded tokens sort last and are never attended.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import AttnBlock, ceil_div, factory_kwargs, resolve_heads, to_map, to_tokens
from ..layers.compat import is_exporting
from ..layers.hashing import (
    attend_lse,
    e2lsh_project,
    gather_tokens,
    hash_draw,
    merge_rounds,
    resolve_seed,
    seeded_normal,
    seeded_uniform,
    sort_with_inverse,
    stable_argsort,
    xbox_plus,
)
from ..registry import register_attn


@register_attn(
    "smyrf",
    title="SMYRF: Efficient Attention using Asymmetric Clustering",
    arxiv="2010.05315",
    year=2020,
    family="hashing",
    complexity="O(N·log N·D)",
    flops_exponent=1.0,
    native_2d=False,
    causal=False,
    identity_init=True,
    idea="XBOX+ asymmetric transforms + E2LSH sort into balanced query/key clusters; dense attention per cluster",
    reference="https://github.com/giannisdaras/smyrf",
    random_in_training=True,  # fresh asymmetric-LSH draws every call
)
class Smyrf(AttnBlock):
    """SMYRF attention, ``x + proj(attn(LayerNorm(x)))`` with a zero-initialised projection.

    Per head and round, F(q) and G(k) (XBOX+: nearest neighbour = largest inner product) are
    projected by one E2LSH function; queries and keys are sorted by that value separately and the
    i-th block of ``cluster_size`` queries attends (softmax with 1/sqrt(d), which the reference code
    omits unless asked) to the i-th block of keys. Rounds are merged with weights
    softmax_r(logsumexp_r). The E2LSH parameters are buffers drawn from a seeded generator
    (deterministic, batch-independent eval), redrawn at every training call as in the authors' code.

    Args:
        channels: input channels C.
        heads: attention heads (default: heads of 32 channels, ``default_heads``).
        n_hashes: hashing rounds (the authors' pretrained-BigGAN setting: 4).
        cluster_size: queries (= keys) per cluster (the authors' pretrained-BigGAN setting: 32);
            maps with fewer tokens form one cluster, which is exact dense attention.
        qkv_bias: bias of the q/k/v projections.
        seed: seed of the E2LSH draws (None: drawn from the global RNG at construction).
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        n_hashes: int = 4,
        cluster_size: int = 32,
        qkv_bias: bool = True,
        seed: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        heads = resolve_heads(channels, heads, "smyrf")
        for name, value in (("n_hashes", n_hashes), ("cluster_size", cluster_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"smyrf: {name} must be a positive int, got {value!r}")
        dd = factory_kwargs(device, dtype)
        self.heads, self.head_dim = heads, channels // heads
        self.n_hashes, self.cluster_size = n_hashes, cluster_size
        self.norm = nn.LayerNorm(channels, **dd)
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        seed = resolve_seed(seed)
        # E2LSH a ~ N(0, I) on the (d + 2)-dim XBOX+ space and b ~ U[0, r) with r = 1, per head and round.
        self.register_buffer("alpha", seeded_normal((heads, self.head_dim + 2, n_hashes), seed, **dd))
        self.register_buffer("beta", seeded_uniform((heads, 1, n_hashes), seed + 1, **dd))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        n = height * width
        c = min(self.cluster_size, n)
        n_pad = ceil_div(n, c) * c
        q, k, v = rearrange(self.qkv(self.norm(to_tokens(x))), "b n (t h d) -> t b h n d", t=3, h=self.heads)
        # An exported graph serves every H, W, so it pads and masks even when nothing is padded here.
        padded = n_pad > n or is_exporting()
        if padded:
            q, k, v = (F.pad(t, (0, 0, 0, n_pad - n)) for t in (q, k, v))
        valid = torch.arange(n_pad, device=x.device) < n

        with torch.no_grad():
            fq, gk = xbox_plus(q, k, valid)
            alpha = hash_draw(self.alpha, self.training)
            beta = hash_draw(self.beta, self.training, law="uniform")
            # Padding sorts last in both orders, so it fills the tail of the last query/key clusters,
            # whose remaining (c - padding >= 1) keys are real: no row is left without a key.
            hq = e2lsh_project(fq, alpha, beta).masked_fill(~valid, float("inf"))  # (b, h, R, n_pad)
            hk = e2lsh_project(gk, alpha, beta).masked_fill(~valid, float("inf"))
            q_perm, q_inv = sort_with_inverse(hq)
            k_perm = stable_argsort(hk)
            key_ok = (k_perm < n).unflatten(-1, (-1, c)).unsqueeze(-2)  # (b, h, R, clusters, 1, c)

        sq = gather_tokens(q * self.head_dim**-0.5, q_perm).unflatten(3, (-1, c))  # (b, h, R, clusters, c, d)
        sk = gather_tokens(k, k_perm).unflatten(3, (-1, c))
        sv = gather_tokens(v, k_perm).unflatten(3, (-1, c))
        dots = torch.einsum("...id,...jd->...ij", sq, sk)
        if padded:
            dots.masked_fill_(~key_ok, float("-inf"))
        out, lse = attend_lse(dots, sv)
        out = gather_tokens(out.flatten(3, 4), q_inv)  # unsort the queries
        out = merge_rounds(out, lse.flatten(3).gather(-1, q_inv), dim=2)[:, :, :n]
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))
        return x + to_map(out, height, width)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, heads={self.heads}, n_hashes={self.n_hashes}, "
            f"cluster_size={self.cluster_size}"
        )
