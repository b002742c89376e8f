"""Mixer cores over the sparse-pattern engine whose key sets go beyond fixed patch windows: the cell pyramids
of the Multi-scale Transformer (retina) and BP-Transformer, and Jukebox's factored patterns that change from
layer to layer. The prefix tokens are global keys of every patch query, in the same softmax."""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..sparse_pattern import Pattern, sparse_attention, with_shared_keys
from ..sparse_pyramid import Pyramid, flatten_levels, pyramid_means, pyramid_pattern, quad_children
from .base import BlockHolder, MixerCore
from .pattern import _image_place, _pattern_qkv, _with_prefix

__all__ = ["MultiScaleCore", "BPTCore", "JukeboxCore"]


def _cells_qkv(q, k, v, prefix, pattern: Pattern, place, cells_k, cells_v) -> torch.Tensor:
    """Patch queries through :func:`sparse_attention` when the pattern's extra tokens are pooled cells:
    key table = grid positions (patches at ``place``, padding elsewhere), the ``pattern.extra`` cells
    (``cells_k``/``cells_v`` (B, h, E, d)), then the prefix tokens, shared by every tile. (pattern.py's
    ``_pattern_qkv`` is the case without cells.) Returns (B, h, H*W, d)."""
    b, h, _, d = q.shape
    n, cells = pattern.grid.n, pattern.extra
    (seg,) = pattern.segments
    if prefix:
        glob = torch.arange(n + cells, n + cells + prefix, device=q.device)
        pattern = pattern._replace(segments=(with_shared_keys(seg, glob),), extra=cells + prefix)

    def tokens(t):
        return rearrange(t, "b h n d -> b n (h d)")

    def table(t, cell_t):
        body = t.new_zeros(b, h, n, d).index_copy(2, place, t[:, :, prefix:])
        return torch.cat([tokens(body), tokens(cell_t), tokens(t[:, :, :prefix])], dim=1)

    qg = tokens(q.new_zeros(b, h, n, d).index_copy(2, place, q[:, :, prefix:]))
    out = sparse_attention(qg, table(k, cells_k), table(v, cells_v), pattern, h)
    return rearrange(out, "b n (h d) -> b h n d", h=h).index_select(2, place)


def _patch_maps(t: torch.Tensor, grid, prefix: int) -> torch.Tensor:
    """(B, h, P + H*W, d) -> the patch tokens as a (B, h*d, H, W) map (heads stacked on the channels)."""
    return rearrange(t[:, :, prefix:], "b h (y x) d -> b (h d) y x", y=grid[0])


def _level_tokens(maps: list[torch.Tensor], heads: int) -> torch.Tensor:
    """Per-level (B, h*d, h_l, w_l) cell maps -> (B, h, cells, d) in the pyramid's extra-token order."""
    return rearrange(flatten_levels(maps), "b n (h d) -> b h n d", h=heads)


class _CellsCore(MixerCore):
    """The pattern engine over a pyramid of the patch grid (multiscale's retina, BPT's quadtree): the key
    set of :func:`pyramid_pattern` with ``side`` cells per side per level, where the level-l keys are cell
    tokens that the subclass makes from the patch k/v maps (``cell_tokens``), plus the prefix tokens."""

    side: int
    levels: int | None

    def cell_tokens(self, k_maps, v_maps, depth: int, heads: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        pyr = Pyramid.of(height, width, self.side, self.levels)
        pattern = pyramid_pattern(pyr, device=q.device).pattern
        place = _image_place(height, width, pattern.grid.cols, q.device)
        b, h, _, d = q.shape
        if pyr.depth > 1:
            maps = _patch_maps(k, grid, prefix), _patch_maps(v, grid, prefix)
            cells_k, cells_v = self.cell_tokens(*maps, pyr.depth, h)
        else:
            cells_k = cells_v = q.new_zeros(b, h, 0, d)
        return _cells_qkv(q, k, v, prefix, pattern, place, cells_k, cells_v)


class MultiScaleCore(_CellsCore):
    """The Multi-scale Transformer's retina pattern (:mod:`visattn.attn.multiscale`): each patch attends the
    patches of its fine neighbourhood and, at every coarser scale, the ring of pooled cells (means of
    2^l x 2^l patches) that the finer scales do not cover, plus the prefix tokens, in one softmax. Pooling is
    linear, so a cell's key/value is the mean of its patches' pretrained keys/values, as the block pools its
    input before the projections. Dense limit: ``radius >= ceil(max(H, W) / 2) - 1`` (the fine window covers
    the grid and no pooled level is needed), or ``levels=1`` with that radius."""

    def __init__(self, dim: int, heads: int, *, radius: int = 2, levels: int | None = None) -> None:
        super().__init__(dim, heads)
        BlockHolder("multiscale", radius=radius, levels=levels)  # the block validates and names itself
        self.radius, self.levels = radius, levels

    @property
    def side(self) -> int:
        return self.radius

    def cell_tokens(self, k_maps, v_maps, depth, heads):
        # k and v pooled in one pass: a cell is the plain mean of its real patches.
        means = pyramid_means(torch.cat([k_maps, v_maps], 1), depth)
        return _level_tokens(means, 2 * heads).chunk(2, dim=1)


class BPTCore(_CellsCore):
    """BP-Transformer on the patch grid (:mod:`visattn.attn.bpt`): the quadtree interaction lists (``k``
    cells per side at every level, fine near, coarse far) of each patch, plus the prefix tokens, in one
    softmax. The cells come from BPT's bottom-up (affiliated) edges: per head, a level-l cell attends its
    four level-(l-1) children with a learned query ``up_query[min(l, clip_levels) - 1]`` over the children's
    keys, and takes the weighted children's keys and values. ``up_query`` (clip_levels, heads, head_dim) is the
    one new parameter, zero-initialised as the block's span nodes (first attention uniform: a cell is the mean
    of its children). BPT's relative-position keys are left out: they would be new scores on top of the
    pretrained q·k of a ViT that already has absolute position embeddings. Dense limit:
    ``k >= ceil(max(H, W) / 2) - 1`` (no level of cells)."""

    def __init__(self, dim: int, heads: int, *, k: int = 1, levels: int | None = None,
                 clip_levels: int = 10) -> None:  # fmt: skip
        super().__init__(dim, heads)
        BlockHolder("bpt", k=k, levels=levels, clip_levels=clip_levels, rel_pos=False)
        self.k, self.levels, self.clip_levels = k, levels, clip_levels
        self.up_query = nn.Parameter(torch.zeros(clip_levels, heads, self.head_dim))

    def reset_parameters(self) -> None:
        """BPT's span nodes start at zero: their first bottom-up attention is uniform over the children."""
        nn.init.zeros_(self.up_query)

    def cells(self, k_map: torch.Tensor, v_map: torch.Tensor, depth: int):
        """Bottom-up pass on (B, h*d, H, W) key/value maps: per level 1 .. depth-1 the (B, h*d, h_l, w_l)
        cell keys and values, each cell attending its (real) children by the level's ``up_query``."""
        heads, d = self.heads, self.head_dim
        valid = k_map.new_ones(1, 1, *k_map.shape[-2:])
        out_k, out_v = [], []
        for lv in range(1, depth):  # a loop over the pyramid's levels (log N of them)
            child_k = quad_children(k_map).unflatten(1, (heads, d))  # (B, h, d, h_l, w_l, 4)
            child_v = quad_children(v_map).unflatten(1, (heads, d))
            valid = quad_children(valid)  # (1, 1, h_l, w_l, 4)
            query = self.up_query[min(lv, self.clip_levels) - 1]  # (h, d)
            score = torch.einsum("bhdyxc,hd->bhyxc", child_k, query) * d**-0.5
            weight = score.masked_fill(valid == 0, float("-inf")).softmax(-1)[:, :, None]
            k_map, v_map = (weight * child_k).sum(-1).flatten(1, 2), (weight * child_v).sum(-1).flatten(1, 2)
            valid = valid.amax(-1)
            out_k.append(k_map)
            out_v.append(v_map)
        return out_k, out_v

    @property
    def side(self) -> int:
        return self.k

    def cell_tokens(self, k_maps, v_maps, depth, heads):
        levels_k, levels_v = self.cells(k_maps, v_maps, depth)
        return _level_tokens(levels_k, heads), _level_tokens(levels_v, heads)


class JukeboxCore(MixerCore):
    """Jukebox's factored attention (:mod:`visattn.attn.jukebox`) spread over the ViT's depth as in the paper:
    mixer ``i`` (``layer_index``, set by :func:`visattn.models.vit.attach_grid`) runs
    ``attn_order[i % len(attn_order)]``: block (row), transpose-block (column) or previous-block (previous
    row) attention, built by the block's own ``pattern``, plus the prefix tokens as global keys. Blocks are
    ``block_ctx`` consecutive raster positions (None: the grid width W, i.e. rows and columns of the patch
    grid, the CNN block's 2D reading; an int views the raster sequence as blocks of that length, as the
    paper does). A patch of the first block in a previous-block layer attends only the prefix tokens (0
    without any). Dense limit: ``attn_order=("row",)`` with ``block_ctx >= H*W`` (one block)."""

    def __init__(self, dim: int, heads: int, *, attn_order=("row", "column", "prev_row"),
                 block_ctx: int | None = None) -> None:  # fmt: skip
        super().__init__(dim, heads)
        if block_ctx is not None and (
            isinstance(block_ctx, bool) or not isinstance(block_ctx, int) or block_ctx < 1
        ):
            raise ValueError(
                f"jukebox (ViT mixer): block_ctx must be None (the patch grid's width) or an int >= 1, "
                f"got {block_ctx!r}"
            )
        self.holder = BlockHolder("jukebox", attn_order=attn_order)
        self.attn_order, self.block_ctx = self.holder.block.attn_order, block_ctx
        self.layer_index: int | None = None

    def kind(self) -> str:
        """This layer's attention type, by its depth among the ViT's mixers."""
        if self.layer_index is None:
            raise ValueError(
                "jukebox (ViT mixer): layer_index is not set, so the core cannot tell which of "
                f"{self.attn_order} this layer runs; build the model with visattn.create_model or call "
                "visattn.models.vit.attach_grid(model) after timm.create_model"
            )
        return self.attn_order[self.layer_index % len(self.attn_order)]

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        n = height * width
        cols = width if self.block_ctx is None else self.block_ctx
        rows = -(-n // cols)
        pattern = self.holder.get(q.device, self.training).pattern(self.kind(), rows, cols, q.device)
        # The raster sequence on a rows x cols grid: positions past H*W are padding, never keys.
        pattern = pattern._replace(grid=pattern.grid._replace(length=n))
        place = torch.arange(n, device=q.device)
        return _pattern_qkv(q, k, v, grid, prefix, _with_prefix(pattern, prefix), place)

    def extra_repr(self) -> str:
        return f"attn_order={self.attn_order}, block_ctx={self.block_ctx}, layer_index={self.layer_index}"
