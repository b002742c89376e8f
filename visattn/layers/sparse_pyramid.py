"""Coarse-cell pyramids and relative-key scores on top of :mod:`visattn.layers.sparse_pattern`.

Used by BP-Transformer (``bpt``) and the Multi-scale Transformer (``multiscale``) for the pyramid, and by
ETC and ``bpt`` for relative-position keys, whose scores depend on the query and so on the batch item
(:func:`attend_with_bias`, :func:`relative_scores`). It only adds builders; the engine is unchanged.

Pyramid
-------
Level 0 is the pixels of the real ``h x w`` map; level ``l >= 1`` holds cells of ``2^l x 2^l`` pixels,
``ceil(h / 2^l) x ceil(w / 2^l)`` of them (border cells hold fewer real pixels). Every cell is the parent of
the (up to) four level-``l-1`` cells it covers. For a pixel ``p`` let ``a_l(p)`` be its level-``l`` cell and
``N_l(p)`` the level-``l`` cells within Chebyshev distance ``r`` of ``a_l(p)``. The keys of ``p`` are

    level 0:      children(N_1(p))                     (pixels of the aligned fine neighbourhood)
    level l > 0:  children(N_{l+1}(p)) minus N_l(p)    (a ring of level-l cells)

for ``l < L``, the "interaction lists" of the fast multipole method: the neighbours of the parent's
neighbourhood that are not the cell's own neighbours. Because ``area(N_l) <= area(children(N_{l+1}))`` the
rings are disjoint and nest, so once ``L`` is the first level whose grid is at most ``r + 1`` cells per
side (``N_L`` is then the whole map) every pixel of the map lies in exactly one key of ``p``: fine near,
coarse far, at most ``(2(2r+1))^2`` pixels plus ``3(2r+1)^2`` cells per level: ``O(r^2 log N)`` keys.

The cells are extra tokens of the engine's key table (level 1 first, row-major per level). The query tiles
are ``th x tw`` pixel blocks (powers of two); a tile gathers, per level, the children of the union of its
pixels' parent neighbourhoods, and ``member`` selects each pixel's ring.

Causal
------
A cell is visible to a causal query only when every real pixel it holds is at a raster position <= the
query (``extra_pos`` = its last real pixel), and its content comes from its own pixels only, so nothing leaks.
The cost: cells that cross the query's current row band are incomplete, so the pixels they cover (rows of
the band at or above the query, farther than the finer rings) are outside the causal receptive field until
the band is finished; the pixel part keeps every past pixel of the fine neighbourhood.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from .sparse_pattern import Grid, Pattern, Segment, ceil_div, flat_meshgrid, sparse_attention, symbolic_sizes

__all__ = [
    "Pyramid",
    "attend_with_bias",
    "flatten_levels",
    "pyramid_means",
    "pyramid_pattern",
    "quad_children",
    "relative_scores",
]


_EXPORT_MAX_SIDE = 4096


def _full_depth(height: int, width: int, radius: int) -> int:
    depth = 1
    while ceil_div(height, 2**depth) > radius + 1 or ceil_div(width, 2**depth) > radius + 1:
        depth += 1
    return depth


def _export_bound(n) -> int:
    """The largest value of a symbolic size in the export's range (if unbounded: ``_EXPORT_MAX_SIDE``,
    checked at run time)."""
    try:
        return int(n.node.shape_env.bound_sympy(n.node.expr).upper)
    except (AttributeError, TypeError, ValueError, OverflowError):
        torch._check(n <= _EXPORT_MAX_SIDE, lambda: f"pyramid: export supports sides <= {_EXPORT_MAX_SIDE}")
        return _EXPORT_MAX_SIDE


def _pow2_tile(n: int, cap: int = 8) -> int:
    t = 1
    while t < min(n, cap):
        t *= 2
    return t


class Pyramid(NamedTuple):
    """The cell pyramid of an ``height x width`` map with neighbourhood radius ``radius`` (in cells).

    ``depth`` = L, the number of levels that give keys (0 = pixels .. L - 1). Build with :meth:`of`.
    """

    height: int
    width: int
    radius: int
    depth: int

    @classmethod
    def of(cls, height: int, width: int, radius: int, levels: int | None = None) -> Pyramid:
        """The full pyramid (``levels=None``: up to where ``N_L`` covers the map), or its first ``levels``.

        Under a dynamic-shape export (:func:`~visattn.layers.sparse_pattern.symbolic_sizes`) the depth is
        that of the largest map the export admits: the levels a smaller map does not need have empty rings
        (its own coarsest level is already one neighbourhood), so the key sets are the same.
        """
        if symbolic_sizes(height, width):
            depth = _full_depth(_export_bound(height), _export_bound(width), radius)
        else:
            depth = _full_depth(height, width, radius)
        return cls(height, width, radius, depth if levels is None else max(1, min(depth, levels)))

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(rows, cols) of the cell grid of each level 1 .. depth - 1: ``ceil(h / 2^l) x ceil(w / 2^l)``,
        halved level by level as :func:`quad_children` does (the same sizes, also symbolically)."""
        out, rows, cols = [], self.height, self.width
        for _ in range(1, self.depth):
            rows, cols = ceil_div(rows, 2), ceil_div(cols, 2)
            out.append((rows, cols))
        return out

    @property
    def offsets(self) -> list[int]:
        """Index of each level's first cell among the extra tokens."""
        out, total = [], 0
        for r, c in self.shapes:
            out.append(total)
            total += r * c
        return out

    @property
    def cells(self) -> int:
        return sum(r * c for r, c in self.shapes)

    @property
    def tile(self) -> tuple[int, int]:
        if symbolic_sizes(self.height, self.width):
            return 8, 8  # _pow2_tile's cap: its loop would pin the exported sizes
        return _pow2_tile(self.height), _pow2_tile(self.width)

    def last_pixel(self, cols: int, device=None) -> torch.Tensor:
        """(cells,) raster position on a grid of ``cols`` columns of each cell's last real pixel."""
        parts = []
        for lv, (r, c) in enumerate(self.shapes, start=1):
            s = 2**lv
            rr = (torch.arange(1, r + 1, device=device) * s).clamp(max=self.height) - 1
            cc = (torch.arange(1, c + 1, device=device) * s).clamp(max=self.width) - 1
            parts.append((rr[:, None] * cols + cc[None, :]).reshape(-1))
        if not parts:
            return torch.zeros(0, dtype=torch.long, device=device)
        return torch.cat(parts)


class PyramidPattern(NamedTuple):
    """:func:`pyramid_pattern`'s result: the engine pattern and, per level, the offsets in cells of the
    level's candidate rows / columns from the query's own cell at that level, ``dy`` (T, Q, n_r) and
    ``dx`` (T, Q, n_c); the level's key slots are their row-major product (for relative-position labels)."""

    pattern: Pattern
    offsets: list[tuple[torch.Tensor, torch.Tensor]]


def pyramid_pattern(pyr: Pyramid, *, causal: bool = False, device=None) -> PyramidPattern:
    """The pyramid key sets (module docstring) as one engine :class:`Segment` on the padded grid.

    The grid is the map padded to multiples of ``pyr.tile``; the extra tokens are ``pyr.cells`` cells.
    """
    h, w, r = pyr.height, pyr.width, pyr.radius
    th, tw = pyr.tile
    rows, cols = ceil_div(h, th) * th, ceil_div(w, tw) * tw
    grid = Grid(rows, cols, h, w)
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    tr, tc = (t.reshape(-1, 1) for t in flat_meshgrid(rows // th, cols // tw, device=device))
    u, v = (t.reshape(1, -1) for t in torch.meshgrid(ar(th), ar(tw), indexing="ij"))
    qy, qx = tr * th + u, tc * tw + v  # (T, Q)
    keys, members, offsets = [], [], []
    shapes, starts = [(h, w), *pyr.shapes], [0, *(grid.n + o for o in pyr.offsets)]
    for lv in range(pyr.depth):
        up = lv + 1  # the parent level
        # Candidate rows / columns of the tile: children of its pixels' parent neighbourhoods.
        kr = 2 * (((tr * th) >> up) - r) + ar(2 * (max(th >> up, 1) + 2 * r))[None, :]  # (T, n_r)
        kc = 2 * (((tc * tw) >> up) - r) + ar(2 * (max(tw >> up, 1) + 2 * r))[None, :]  # (T, n_c)
        lr, lc = shapes[lv]
        inside = ((kr >= 0) & (kr < lr))[:, :, None] & ((kc >= 0) & (kc < lc))[:, None, :]
        ids = starts[lv] + kr[:, :, None] * (cols if lv == 0 else lc) + kc[:, None, :]
        keys.append(torch.where(inside, ids, -1).flatten(1))
        # Chebyshev conditions are separable: per row and per column, combined by an outer product.
        near_r = ((kr >> 1)[:, None, :] - (qy >> up)[:, :, None]).abs() <= r
        near_c = ((kc >> 1)[:, None, :] - (qx >> up)[:, :, None]).abs() <= r
        member = near_r[..., :, None] & near_c[..., None, :]
        dy, dx = kr[:, None, :] - (qy >> lv)[:, :, None], kc[:, None, :] - (qx >> lv)[:, :, None]
        if lv > 0:
            member = member & ~((dy.abs() <= r)[..., :, None] & (dx.abs() <= r)[..., None, :])
        members.append(member.flatten(2))
        offsets.append((dy, dx))
    seg = Segment(qy * cols + qx, torch.cat(keys, 1), torch.cat(members, 2))
    extra_pos = pyr.last_pixel(cols, device) if causal and pyr.cells else None
    return PyramidPattern(Pattern(grid, (seg,), causal, extra=pyr.cells, extra_pos=extra_pos), offsets)


# ------------------------------------------------------------------------------------------ cells


def quad_children(t: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, ceil(h/2), ceil(w/2), 4): the four children of every parent cell (row-major),
    zero where a child lies outside the map."""
    h, w = t.shape[-2:]
    ph, pw = ceil_div(h, 2), ceil_div(w, 2)
    t = F.pad(t, (0, 2 * pw - w, 0, 2 * ph - h)).flatten(-2)
    # A gather in (cell, child) order, not a rearrange: strided views of symbolic sizes make the exporter
    # check which sizes are 1, which pins them (the coarse levels of the example input are 1 x 1).
    r, c, i, j = flat_meshgrid(ph, pw, 2, 2, device=t.device)
    return t.index_select(-1, (2 * r + i) * (2 * pw) + 2 * c + j).unflatten(-1, (ph, pw, 4))


def pyramid_means(x: torch.Tensor, depth: int) -> list[torch.Tensor]:
    """Mean of the real pixels of every cell of levels 1 .. depth - 1: a list of (B, C, h_l, w_l)."""
    sums, count = x, x.new_ones(1, 1, *x.shape[-2:])
    out = []
    for _ in range(1, depth):
        sums, count = quad_children(sums).sum(-1), quad_children(count).sum(-1)
        out.append(sums / count)
    return out


def flatten_levels(maps: list[torch.Tensor]) -> torch.Tensor | None:
    """Level maps (B, C, h_l, w_l) -> extra tokens (B, sum h_l w_l, C) in :class:`Pyramid` order, or None."""
    if not maps:
        return None
    # Concatenate, then transpose once: transposing the (often 1 x 1) coarse levels one by one makes the
    # exporter check which of their sizes are 1, which pins them.
    return torch.cat([m.flatten(2) for m in maps], dim=2).transpose(1, 2)


# ------------------------------------------------------------------------------- relative keys


def relative_scores(
    q: torch.Tensor,
    table: torch.Tensor,
    labels: torch.Tensor,
    queries: torch.Tensor,
    heads: int,
    label_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Relative-key scores ``q_i · a_label(i, j)`` (Shaw et al.; ETC, BPT) for one engine segment.

    Args:
        q: (B, N, C) projected queries in grid order.
        table: (R, heads, d) per-head or (R, d) head-shared relative key embeddings ``a``.
        labels: (T, Q, K) long in [0, R): the label of every (query, key slot) of the segment.
        queries: (T, Q) the segment's query positions.
        label_bias: optional (R, heads) scalar per label and head, added to ``q_i · a`` (ETC).
    Returns:
        (T, B * heads, Q, K), the ``bias`` of :func:`attend_with_bias` (unscaled).
    """
    b, n, c = q.shape
    qh = q.reshape(b, n, heads, c // heads)
    if table.dim() == 2:
        qa = torch.einsum("bnhd,rd->nbhr", qh, table)
    else:
        qa = torch.einsum("bnhd,rhd->nbhr", qh, table)
    if label_bias is not None:
        qa = qa + label_bias.t()
    qa = qa.reshape(n, b * heads, -1)
    t, nq = queries.shape
    qa = qa.index_select(0, queries.reshape(-1)).view(t, nq, b * heads, -1)
    out = qa.gather(3, labels[:, :, None, :].expand(-1, -1, b * heads, -1))
    return out.transpose(1, 2)


def attend_with_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    heads: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`~visattn.layers.sparse_pattern.sparse_attention` with one single-segment bias that depends on
    the batch item ((T, B * heads, Q, K), e.g. :func:`relative_scores`): the batch is folded into the heads
    (heads are independent), so the engine's per-head bias carries it."""
    b = q.shape[0]
    if bias is None:
        return sparse_attention(q, k, v, pattern, heads)
    fold = lambda t: rearrange(t, "b n c -> 1 n (b c)")  # noqa: E731
    out = sparse_attention(
        fold(q), fold(k), fold(v), pattern, b * heads, scale=(q.shape[-1] // heads) ** -0.5, bias=[bias]
    )
    return rearrange(out, "1 n (b c) -> b n c", b=b)
