"""Big Bird: Transformers for Longer Sequences — https://arxiv.org/abs/2007.14062

2D adaptation: BigBird's blocks of b = 64 tokens become 8 x 8 patches. Every query patch attends the 3 x 3
neighbouring patches (sliding window), g global patches (ITC: the first and last patches in raster order,
which also attend everything) and r random patches drawn outside the window and the globals. The random
draw is a seeded hash of (query patch, key patch, buffer ``rand_key``): fixed, identical in train and eval,
independent of the global RNG. ``causal=True`` masks future pixels and draws random patches among earlier
ones.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import AttnBlock, factory_kwargs, resolve_heads, to_tokens
from ..layers.sparse_pattern import (
    Grid,
    Pattern,
    Segment,
    block_segment,
    ceil_div,
    crop_to_map,
    first_occurrence,
    flat_meshgrid,
    pad_to_grid,
    sparse_attention,
)
from ..registry import register_attn


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply), exact on every device."""
    x = x & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (x >> 16) ^ x


@register_attn(
    "bigbird",
    title="Big Bird: Transformers for Longer Sequences",
    arxiv="2007.14062",
    year=2020,
    family="sparse",
    complexity="O(N·(w + g + r)·b·D)",
    flops_exponent=1.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="block-sparse attention: 3x3 neighbouring patches + global patches + r fixed random patches",
    reference="https://github.com/google-research/bigbird",
)
class BigBird(AttnBlock):
    """Block-sparse window + global + random attention, ``x + proj(attn(x))`` with a zero-initialised proj.

    Args:
        channels: input channels C.
        block_size: patch side P (paper: blocks of b = 64 tokens, so 8 x 8).
        window: neighbouring patches per side of the window (odd; paper: w = 3 blocks, here 3 x 3).
        num_global: global patches g (paper ITC: 2, the first and the last).
        num_random: random patches r per query patch (paper: 3).
        random_seed: seeds the ``rand_key`` buffer that fixes the random patches.
        heads: attention heads (default: ``default_heads(C)``).
        qkv_bias: bias in the q/k/v projections.
        causal: keys at or before the query in raster order.
    """

    def __init__(
        self,
        channels: int,
        *,
        block_size: int = 8,
        window: int = 3,
        num_global: int = 2,
        num_random: int = 3,
        random_seed: int = 0,
        heads: int | None = None,
        qkv_bias: bool = True,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if block_size < 1:
            raise ValueError(f"bigbird: block_size must be >= 1, got {block_size}")
        if window < 1 or window % 2 == 0:
            raise ValueError(f"bigbird: window must be odd and >= 1, got {window}")
        if num_global < 0 or num_random < 0:
            raise ValueError(
                f"bigbird: num_global and num_random must be >= 0, got {num_global}, {num_random}"
            )
        heads = resolve_heads(channels, heads, "bigbird")
        dd = factory_kwargs(device, dtype)
        self.block_size, self.window, self.num_global, self.num_random = (
            block_size,
            window,
            num_global,
            num_random,
        )
        self.heads, self.causal = heads, causal
        g = torch.Generator().manual_seed(random_seed)
        self.register_buffer("rand_key", torch.randint(0, 2**31 - 1, (2,), generator=g).to(device))
        self.q = nn.Linear(channels, channels, bias=qkv_bias, **dd)
        self.kv = nn.Linear(channels, 2 * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def patterns(self, height: int, width: int, device=None) -> tuple[Pattern, Pattern | None]:
        """(block-sparse pattern of every query, dense pattern of the global patches' queries or None).

        The global patches' queries use the second pattern: it holds all keys, so it is their union.
        """
        p = self.block_size
        nbh, nbw = ceil_div(height, p), ceil_div(width, p)
        nb = nbh * nbw
        grid = Grid(nbh * p, nbw * p, height, width)
        # Index arithmetic only on tensors, never a Python branch on the sizes (exportable with dynamic H, W).
        tr, tc = flat_meshgrid(nbh, nbw, device=device)
        tile = tr * nbw + tc
        rad = self.window // 2
        orow, ocol = (o - rad for o in flat_meshgrid(self.window, self.window, device=device))
        wr, wc = tr[:, None] + orow[None], tc[:, None] + ocol[None]
        window = torch.where((wr >= 0) & (wr < nbh) & (wc >= 0) & (wc < nbw), wr * nbw + wc, -1)
        # The first ceil(g/2) and the last floor(g/2) patches, ascending; on maps of fewer than g patches
        # they repeat (first_occurrence drops repeated keys; a repeated global query is computed twice).
        first = (self.num_global + 1) // 2
        last = self.num_global - first
        ar = lambda n: torch.arange(n, device=device)  # noqa: E731
        glob = torch.cat([ar(first), ar(last) + (nb - last)]).clamp(0, nb - 1)
        parts = [window, glob[None].expand(window.shape[0], -1)]
        r = self.num_random
        if r:
            near = ((tr[None] - tr[:, None]).abs() <= rad) & ((tc[None] - tc[:, None]).abs() <= rad)
            allowed = ~near & ~(tile[:, None] == glob[None]).any(-1)[None]  # (query patch, candidate)
            if self.causal:
                allowed = allowed & (tile[None] <= tile[:, None])
            key = self.rand_key.to(device)
            score = _mix32(_mix32(tile[:, None] + key[0]) ^ (tile[None] + key[1]))
            score = torch.where(allowed, score, score + 2**33)  # disallowed patches lose every draw
            # r never-allowed dummy candidates after the nb patches: topk(r) needs no min(r, nb).
            allowed = torch.cat([allowed, allowed.new_zeros(allowed.shape[0], r)], dim=1)
            score = torch.cat([score, score.new_full((score.shape[0], r), 2**35)], dim=1)
            # Unique keys (score, candidate): ties go to the lower index in torch and onnxruntime alike.
            n = score.shape[1]
            pick = (score * n + ar(n)).topk(r, dim=1, largest=False).indices
            parts.append(torch.where(allowed.gather(1, pick), pick, -1))
        blocks = torch.cat(parts, dim=1)
        blocks = torch.where(first_occurrence(blocks), blocks, -1)
        sparse = Pattern(grid, (block_segment(grid, p, blocks),), self.causal)
        if not self.num_global:
            return sparse, None
        queries = sparse.segments[0].queries[glob]
        keys = torch.arange(grid.n, device=device)[None].expand(self.num_global, -1)
        return sparse, Pattern(grid, (Segment(queries, keys),), self.causal)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        sparse, dense = self.patterns(h, w, x.device)
        t = to_tokens(pad_to_grid(x, sparse.grid.rows, sparse.grid.cols))
        q = self.q(t)
        k, v = self.kv(t).chunk(2, dim=-1)
        out = sparse_attention(q, k, v, sparse, self.heads)
        if dense is not None:
            is_global = torch.zeros(sparse.grid.n, dtype=torch.bool, device=x.device)
            is_global[dense.segments[0].queries.reshape(-1)] = True
            out = torch.where(is_global[:, None], sparse_attention(q, k, v, dense, self.heads), out)
        return x + crop_to_map(self.proj(out), sparse.grid, h, w)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, block_size={self.block_size}, window={self.window}, "
            f"num_global={self.num_global}, num_random={self.num_random}, causal={self.causal}"
        )
