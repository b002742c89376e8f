"""BP-Transformer: Modelling Long-Range Context via Binary Partitioning — https://arxiv.org/abs/1911.04070

2D adaptation (an extrapolation, not in the paper): the binary partition tree over the sequence becomes a
quadtree over the map (cells of 2^l x 2^l pixels). BPT's contextual edges -- k nodes on each side at every
level, fine near and coarse far, taking the uncovered child where a parent would overlap the finer nodes --
become the quadtree interaction lists (visattn.layers.sparse_pyramid): at level l a pixel attends the
children of its parent's k-neighbourhood that are not its own k-neighbours, so the keys of all levels tile
the map exactly once with O(k² log N) keys. BPT's affiliated edges (span nodes attend to what they contain)
become a bottom-up pass in which every cell attends to its four children; edge-type relative keys (level,
offset) as in BPT's ``rel_pos``. A single block runs the bottom-up pass first, then the pixels' attention.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import (
    AttnBlock,
    factory_kwargs,
    resolve_heads,
    to_tokens,
)
from ..layers.sparse_pattern import PatternAttention, crop_to_map, pad_to_grid
from ..layers.sparse_pyramid import (
    Pyramid,
    attend_with_bias,
    flatten_levels,
    pyramid_pattern,
    quad_children,
    relative_scores,
)
from ..registry import register_attn


@register_attn(
    "bpt",
    title="BP-Transformer: Modelling Long-Range Context via Binary Partitioning",
    arxiv="1911.04070",
    year=2019,
    family="sparse",
    complexity="O(N·k²·log N·D)",
    flops_exponent=1.1,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="quadtree partition: each pixel attends k neighbouring cells at every level (fine near, coarse "
    "far); cells attend to their children",
    reference="https://github.com/yzh119/BPT",
)
class BPT(AttnBlock):
    """Binary (here: quad) partition attention, ``x + proj(attn(x))`` with a zero-initialised projection.

    Args:
        channels: input channels C.
        k: neighbouring cells per side at every level (paper: k = 4 nodes per side in 1D; in 2D a ring of
            thickness k holds about 3(2k+1)² cells per level, so k = 1 already gives 27 per level).
        levels: pyramid levels that give keys (None: all, up to where one level covers the map; 1: only
            the pixels of the aligned fine neighbourhood).
        rel_pos: relative keys per edge type (level, cell offset), shared by the heads as in BPT.
        clip_levels: levels above this share their relative keys and bottom-up queries (BPT ``clip_dist``).
        heads: attention heads (default: ``default_heads(C)``).
        qkv_bias: bias in the q/k/v projections (BPT: none).
        causal: pixel keys at or before the query; a cell only once all its pixels are.
    """

    def __init__(
        self,
        channels: int,
        *,
        k: int = 1,
        levels: int | None = None,
        rel_pos: bool = True,
        clip_levels: int = 10,
        heads: int | None = None,
        qkv_bias: bool = False,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if k < 1:
            raise ValueError(f"bpt: k must be >= 1, got {k}")
        if levels is not None and levels < 1:
            raise ValueError(f"bpt: levels must be >= 1 or None, got {levels}")
        if clip_levels < 1:
            raise ValueError(f"bpt: clip_levels must be >= 1, got {clip_levels}")
        heads = resolve_heads(channels, heads, "bpt")
        dd = factory_kwargs(device, dtype)
        self.k, self.levels, self.rel_pos, self.clip_levels = k, levels, rel_pos, clip_levels
        self.heads, self.causal = heads, causal
        head_dim = channels // heads
        self.attn = PatternAttention(channels, heads, qkv_bias=qkv_bias, **dd)
        # Bottom-up queries of the cells, per level and head. Zero = BPT's zero-initialised span nodes,
        # whose first attention over their constituents is uniform (the mean).
        self.up_query = nn.Parameter(torch.zeros(clip_levels, heads, head_dim, **dd))
        self.span = 4 * k + 3  # cell offsets within a ring lie in [-(2k + 1), 2k + 1]
        if rel_pos:
            self.rel_key = nn.Parameter(torch.randn(clip_levels * self.span**2, head_dim, **dd) * 0.02)

    def cells(self, x: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """Bottom-up pass: level-l cells attend (per head) to their four level-(l-1) children; level 0 = x."""
        state, valid = x, x.new_ones(1, 1, *x.shape[-2:])
        out = []
        for lv in range(1, depth):
            # Broadcast products and sums, no einsum / permutes: on the 1 x 1 coarse levels of an exported
            # graph those would check which symbolic sizes are 1 and pin them.
            child = quad_children(state).unflatten(1, (self.heads, -1))  # (B, heads, d, h, w, 4)
            valid = quad_children(valid)  # (1, 1, h, w, 4)
            query = self.up_query[min(lv, self.clip_levels) - 1]  # (heads, d)
            score = (child * query[:, :, None, None, None]).sum(2) * child.shape[2] ** -0.5
            weight = score.masked_fill(valid == 0, float("-inf")).softmax(-1)  # (B, heads, h, w, 4)
            state = (weight[:, :, None] * child).sum(-1).flatten(1, 2)
            valid = valid.amax(-1)
            out.append(state)
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pyr = Pyramid.of(h, w, self.k, self.levels)
        pp = pyramid_pattern(pyr, causal=self.causal, device=x.device)
        grid = pp.pattern.grid
        extra = flatten_levels(self.cells(x, pyr.depth))
        t = to_tokens(pad_to_grid(x, grid.rows, grid.cols))
        context = t if extra is None else torch.cat([t, extra], dim=1)
        q = self.attn.q(t)
        k, v = self.attn.kv(context).chunk(2, dim=-1)
        bias = None
        if self.rel_pos:
            r, parts = 2 * self.k + 1, []
            for lv, (dy, dx) in enumerate(pp.offsets):
                label = min(lv, self.clip_levels - 1) * self.span**2 + (dy.clamp(-r, r) + r) * self.span
                parts.append((label[..., :, None] + (dx.clamp(-r, r) + r)[..., None, :]).flatten(2))
            labels = torch.cat(parts, dim=2)
            scale = (self.channels // self.heads) ** -0.5
            bias = (
                relative_scores(q, self.rel_key, labels, pp.pattern.segments[0].queries, self.heads) * scale
            )
        out = self.attn.proj(attend_with_bias(q, k, v, pp.pattern, self.heads, bias))
        return x + crop_to_map(out, grid, h, w)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, k={self.k}, levels={self.levels}, rel_pos={self.rel_pos}, "
            f"causal={self.causal}"
        )
