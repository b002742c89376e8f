"""Mixer cores over the sparse-pattern engine (:func:`visattn.layers.sparse_pattern.sparse_attention`):
fixed key sets (windows, criss-cross, raster patterns, block-sparse) with the prefix tokens as global keys."""

from __future__ import annotations

import torch
from einops import rearrange

from ..padding import ceil_div
from ..sparse_pattern import (
    Grid,
    Pattern,
    column_segment,
    row_segment,
    sparse_attention,
    window_segment,
    window_tile,
    with_shared_keys,
)
from .base import BlockHolder, MixerCore

__all__ = ["WindowCore", "CrissCrossCore", "RasterPatternCore", "BlockPatternCore", "BigBirdCore"]


def _pattern_qkv(q, k, v, grid_hw, prefix, pattern: Pattern, place: torch.Tensor) -> torch.Tensor:
    """Patch queries through :func:`sparse_attention`: the patch tokens are put at grid positions ``place``
    (H*W,) of ``pattern.grid`` (other positions are padding, never valid keys), the prefix tokens are the
    pattern's extra keys. Returns (B, h, H*W, d)."""
    b, h, _, d = q.shape
    n = pattern.grid.n
    heads = h

    def to_grid(t):
        body = t[:, :, prefix:]
        full = body.new_zeros(b, h, n, d).index_copy(2, place, body)
        return rearrange(full, "b h n d -> b n (h d)")

    qg = to_grid(q)
    kg = torch.cat([to_grid(k), rearrange(k[:, :, :prefix], "b h n d -> b n (h d)")], dim=1)
    vg = torch.cat([to_grid(v), rearrange(v[:, :, :prefix], "b h n d -> b n (h d)")], dim=1)
    out = sparse_attention(qg, kg, vg, pattern, heads)
    return rearrange(out, "b n (h d) -> b h n d", h=heads).index_select(2, place)


def _image_place(height: int, width: int, cols: int, device) -> torch.Tensor:
    """Grid positions of the H x W patch tokens on a padded grid of ``cols`` columns."""
    r = torch.arange(height, device=device)[:, None]
    c = torch.arange(width, device=device)[None, :]
    return (r * cols + c).reshape(-1)


def _with_prefix(pattern: Pattern, prefix: int) -> Pattern:
    """``pattern`` with ``prefix`` extra (global) keys shared by every query of its first segment."""
    if not prefix:
        return pattern
    first, *rest = pattern.segments
    extra = torch.arange(pattern.grid.n, pattern.grid.n + prefix, device=first.keys.device)
    return pattern._replace(segments=(with_shared_keys(first, extra), *rest), extra=prefix)


class WindowCore(MixerCore):
    """Longformer's 2D sliding window: a ``kernel_size`` x ``kernel_size`` (dilated) window around every
    patch, plus the prefix tokens as the global tokens. Dense limit: ``kernel_size >= 2 * max(H, W) - 1``.

    GMAT runs here too (``method="gmat"``): its global memory, read and written densely by every token and
    carried from layer to layer, is what a ViT's prefix tokens are; GMAT's own learned memory tokens would be
    new tokens a pretrained ViT never saw."""

    def __init__(self, dim: int, heads: int, *, kernel_size: int = 15, dilation: int = 1,
                 method: str = "longformer") -> None:  # fmt: skip
        super().__init__(dim, heads)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"{method} (ViT mixer): kernel_size must be odd and >= 1, got {kernel_size}")
        if dilation < 1:
            raise ValueError(f"{method} (ViT mixer): dilation must be >= 1, got {dilation}")
        self.kernel_size, self.dilation = kernel_size, dilation

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        tile = window_tile(self.kernel_size, height, width, self.dilation)
        rows = ceil_div(height, tile[0] * self.dilation) * tile[0] * self.dilation
        cols = ceil_div(width, tile[1] * self.dilation) * tile[1] * self.dilation
        g = Grid(rows, cols, height=height, width=width)
        seg = window_segment(g, self.kernel_size, self.dilation, tile=tile, device=q.device)
        pattern = _with_prefix(Pattern(g, (seg,)), prefix)
        return _pattern_qkv(q, k, v, grid, prefix, pattern, _image_place(height, width, cols, q.device))


class CrissCrossCore(MixerCore):
    """CCNet's criss-cross key set: the row and the column of every patch (itself once) and the prefix
    tokens, under one softmax (one recurrence: a ViT stacks layers instead)."""

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        g = Grid(height, width)
        segs = (row_segment(g, device=q.device), column_segment(g, min_row_distance=1, device=q.device))
        pattern = _with_prefix(Pattern(g, segs), prefix)
        return _pattern_qkv(q, k, v, grid, prefix, pattern, _image_place(height, width, width, q.device))


class RasterPatternCore(MixerCore):
    """Sparse Transformer's strided or fixed pattern on the raster sequence of patches, built by the block's
    own :meth:`visattn.attn.sparse_transformer.SparseTransformer.pattern`. Dense limit: ``stride >= H*W``."""

    def __init__(self, dim: int, heads: int, *, pattern: str = "strided", stride: int | None = None,
                 summary: int = 8) -> None:  # fmt: skip
        super().__init__(dim, heads)
        if pattern not in ("strided", "fixed"):
            raise ValueError(
                f"sparse_transformer (ViT mixer): pattern must be 'strided' or 'fixed', got {pattern!r}"
            )
        if stride is not None and stride < 1:
            raise ValueError(f"sparse_transformer (ViT mixer): stride must be None or >= 1, got {stride}")
        self.kind, self.stride, self.summary, self.causal = pattern, stride, summary, False

    def patches(self, q, k, v, grid, prefix):
        from ...attn.sparse_transformer import SparseTransformer  # the block owns the pattern's definition

        height, width = grid
        pattern = _with_prefix(SparseTransformer.pattern(self, height, width, q.device), prefix)
        place = torch.arange(height * width, device=q.device)
        return _pattern_qkv(q, k, v, grid, prefix, pattern, place)


class BlockPatternCore(MixerCore):
    """The key sets of a sparse block, built by the block's own ``pattern(height, width, device)`` on the
    patch grid (padded as the block pads a map; padding is never a key), with the prefix tokens as global
    keys of every patch. The block is instantiated once, tiny, for its validated hyperparameters and its
    pattern builder (:class:`BlockHolder`: no state-dict keys). Diet: its dilated window."""

    def __init__(self, dim: int, heads: int, *, block: str, **hyperparameters) -> None:
        super().__init__(dim, heads)
        self.holder = BlockHolder(block, **hyperparameters)

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        pattern = self.holder.get(q.device, self.training).pattern(height, width, q.device)
        place = _image_place(height, width, pattern.grid.cols, q.device)
        return _pattern_qkv(q, k, v, grid, prefix, _with_prefix(pattern, prefix), place)


class BigBirdCore(BlockPatternCore):
    """Big Bird on the patch grid through :meth:`visattn.attn.bigbird.BigBird.patterns`: P x P blocks of
    patches attend the 3 x 3 neighbouring blocks, the global blocks (first and last) and r seeded random
    blocks; the global blocks' queries attend every token. The prefix tokens are global tokens on top of
    BigBird's own (ITC's globals are existing tokens: the class token is the natural one). The random draw
    is the block's seeded hash (its ``rand_key`` from ``random_seed``): fixed, not a checkpoint key. Dense
    limit: ``block_size >= max(H, W)`` (one block), or a window of blocks covering the grid."""

    def __init__(self, dim: int, heads: int, **hyperparameters) -> None:
        super().__init__(dim, heads, block="bigbird", **hyperparameters)

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        sparse, dense = self.holder.get(q.device, self.training).patterns(height, width, q.device)
        place = _image_place(height, width, sparse.grid.cols, q.device)
        out = _pattern_qkv(q, k, v, grid, prefix, _with_prefix(sparse, prefix), place)
        if dense is None:
            return out
        glob = torch.zeros(sparse.grid.n, dtype=torch.bool, device=q.device)
        glob[dense.segments[0].queries.reshape(-1)] = True
        # The global blocks' queries hold every key: their rows come from the dense pattern.
        out_g = _pattern_qkv(q, k, v, grid, prefix, _with_prefix(dense, prefix), place)
        return torch.where(glob.index_select(0, place)[:, None], out_g, out)
