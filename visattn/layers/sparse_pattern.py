"""One engine for fixed sparse attention patterns on a 2D grid of tokens.

Sparse Transformer, Jukebox, Longformer, Big Bird, Transformer on a Diet (and ETC, GMAT, BP-Transformer,
Multi-scale Transformer) differ only in *which* keys each query attends to. This module describes that key
set with index arithmetic and attends it without ever building an N x N mask or score matrix.

Vocabulary
----------
grid
    The queries live on a :class:`Grid` of ``rows x cols`` tokens in raster order: grid position
    ``p = r * cols + c``. Usually the (padded) feature map; a sequence method can also view the raster
    sequence as a ``(ceil(N / l), l)`` grid (Sparse Transformer with stride ``l``). Positions outside the
    grid's ``height`` / ``width`` / ``length`` are padding: never valid keys, their query outputs are junk.
key table
    The keys are the grid tokens (indices ``0 .. N-1``) followed by ``extra`` tokens (indices
    ``N .. N+E-1``: global tokens, memory, summaries, pooled cells). ``extra_pos[e]`` is the raster
    position from which extra token ``e`` may be seen by causal queries (``-1``: always, e.g. a learned
    token that carries no input; a pooled cell gets the largest raster position it summarises).
segment
    One part of every query's key set, evaluated tile by tile (:class:`Segment`). The queries are cut into
    tiles (a row, a column, a P x P block, a window tile); every tile gathers ONE shared list of ``K`` key
    indices (``-1`` = empty slot), and a boolean ``member`` mask (broadcastable to ``(T, Q, K)``) says which
    of them each query of the tile really attends. Memory is O(T * K * d) for the gathered keys and
    O(N * K) for masks, i.e. linear in N for a fixed number of keys per tile.
pattern
    :class:`Pattern` = grid + segments + causal flag + extra tokens. A query's key set is the union of its
    members over the segments, intersected with the valid keys (and with the past when ``causal``).
    Rules: the segments of one pattern must be disjoint per query (build them so; :func:`dense_mask`
    checks it), and a tile's key list must not repeat a key (use :func:`first_occurrence`).

Attention
---------
:func:`sparse_attention` (or the :class:`PatternAttention` module: projections + attention + zero-init
output projection) computes, per query, softmax over its key set. With one segment every tile is one
``scaled_dot_product_attention`` call batch (fused kernels, ``(T, B*heads, Q, K)``); with several segments
(different tilings, e.g. a raster band by rows and a column by columns) the scores of all segments are put
side by side per query and normalised by one masked softmax, so the union is attended exactly once.
Queries with no valid key return 0 (Jukebox's previous row of the first row).

Builders
--------
:func:`window_segment` (k x k neighbourhood, dilation, halo tiles), :func:`row_segment` (rows at given
offsets, optional raster radius), :func:`column_segment`, :func:`shared_segment` (the same keys for all
queries: globals, summaries), :func:`block_segment` (P x P query blocks over listed key blocks),
:func:`with_shared_keys` (append shared keys to every tile of a segment, e.g. global tokens to a window).
:func:`segment_coords` gives row/col coordinates of a segment's queries and keys, to refine ``member``
or build relative-position biases (``bias=`` of :func:`sparse_attention`).

Example
-------
A 7 x 7 window plus two extra (global) tokens on an ``h x w`` map, as Longformer builds it::

    tile = window_tile(7, h, w)
    rows, cols = ceil_div(h, tile[0]) * tile[0], ceil_div(w, tile[1]) * tile[1]   # pad the map to this
    grid = Grid(rows, cols, height=h, width=w)
    seg = window_segment(grid, 7, tile=tile, causal=causal, device=x.device)
    seg = with_shared_keys(seg, torch.arange(grid.n, grid.n + 2, device=x.device))
    pattern = Pattern(grid, (seg,), causal, extra=2)
    out = attn(tokens, pattern, extra=global_tokens)   # attn = PatternAttention(C, heads)

Export
------
Builders and blocks take the map size from ``x.shape``; under ``torch.export`` with dynamic H, W these
are symbolic, and every Python branch on them (``min``, ``if``, ``int()``, a view whose strides depend on
whether a size is 1) becomes a guard that pins the exported graph to one size. So the builders use index
arithmetic on flat aranges (:func:`flat_meshgrid`), :func:`ceil_div`, :func:`pad_to_grid` /
:func:`crop_to_map`, and, when :func:`symbolic_sizes`, size-independent plans (a fixed tile) with the same
key sets.

Patterns these builders do not cover (keys on a pooled grid, per-level cells) are plain :class:`Segment`
tuples: compute ``queries``/``keys``/``member`` from coordinates (keys of pooled cells live in the extra
part of the key table; give them ``extra_pos`` = the last raster position they summarise when causal).

Testing
-------
:func:`dense_mask` expands a pattern into the explicit ``(N, N + E)`` boolean mask. It is O(N^2) and
exists for tests only (compare against dense softmax attention, check receptive fields).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .block import factory_kwargs
from .compat import is_exporting
from .padding import ceil_div, pad_to_grid

__all__ = [
    "Grid",
    "Segment",
    "Pattern",
    "PatternAttention",
    "block_segment",
    "backend",
    "ceil_div",
    "choose_backend",
    "column_segment",
    "crop_to_map",
    "dense_mask",
    "first_occurrence",
    "flat_meshgrid",
    "get_backend",
    "pad_to_grid",
    "row_segment",
    "segment_coords",
    "segment_masks",
    "shared_segment",
    "sparse_attention",
    "symbolic_sizes",
    "window_segment",
    "window_tile",
    "with_shared_keys",
]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Grid(NamedTuple):
    """A ``rows x cols`` grid of query tokens in raster order (position ``r * cols + c``).

    ``height``/``width`` (in-map extent of a padded feature map) and ``length`` (valid raster prefix of a
    padded sequence) mark the real tokens; ``None`` means the whole extent.
    """

    rows: int
    cols: int
    height: int | None = None
    width: int | None = None
    length: int | None = None

    @property
    def n(self) -> int:
        return self.rows * self.cols

    def valid(self, device=None) -> torch.Tensor:
        """(N,) bool: True for real (non-padding) tokens."""
        r = torch.arange(self.rows, device=device)[:, None]
        c = torch.arange(self.cols, device=device)[None, :]
        ok = (r < (self.rows if self.height is None else self.height)) & (
            c < (self.cols if self.width is None else self.width)
        )
        ok = ok.reshape(-1)
        if self.length is not None:
            ok = ok & (torch.arange(self.n, device=device) < self.length)
        return ok


class Segment(NamedTuple):
    """One part of the key set, by tiles.

    Attributes:
        queries: (T, Q) long, grid positions of the queries of each tile (tiles never share a query).
        keys: (T, K) long, key-table indices gathered once per tile; ``-1`` marks an empty slot.
        member: bool broadcastable to (T, Q, K) (or ``None`` = all): which gathered keys each query
            attends, before validity / causal masking.
        in_order: True when ``queries.reshape(-1)`` is ``arange(N)`` (tiles are consecutive raster runs,
            e.g. rows): lets the engine skip permutations.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    member: torch.Tensor | None = None
    in_order: bool = False


class Pattern(NamedTuple):
    """A sparse attention pattern: the union over ``segments`` of each query's keys.

    Attributes:
        grid: the query grid.
        segments: disjoint parts of the key set (per query).
        causal: also mask keys whose raster position is after the query's.
        extra: number of extra key tokens after the grid tokens.
        extra_pos: (extra,) long, raster position from which each extra token is visible to causal
            queries (-1: always). ``None``: all -1.
    """

    grid: Grid
    segments: tuple[Segment, ...]
    causal: bool = False
    extra: int = 0
    extra_pos: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------- builders


def first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """Bool mask of ``ids`` (..., K): True at the first slot holding each value >= 0 along the last dim.

    Use it to drop repeated keys from a tile's key list (e.g. a random block that is also a window block).
    """
    k = ids.shape[-1]
    # Unique keys (value, slot) sort like a stable sort of the values, with a plain sort (ONNX has no
    # stable sort); ``// k`` recovers the values (also the -1 of empty slots: slot < k).
    ordered, order = (ids * k + torch.arange(k, device=ids.device)).sort(dim=-1)
    ordered = ordered.div(k, rounding_mode="floor")
    first = torch.cat(
        [torch.ones_like(ordered[..., :1], dtype=torch.bool), ordered[..., 1:] != ordered[..., :-1]], -1
    )
    keep = torch.zeros_like(first).scatter(-1, order, first)
    return keep & (ids >= 0)


def symbolic_sizes(*sizes) -> bool:
    """True while ``torch.export`` traces with symbolic (dynamic) sizes.

    A Python branch on a symbolic size becomes a guard that pins the exported graph to a range of sizes
    (or one size), so the builders then pick size-independent plans (a fixed tile, a fixed pyramid depth)
    that give the same key sets; eager, ``torch.compile`` and static export keep the size-tuned plans.
    """
    return is_exporting() and any(isinstance(s, torch.SymInt) for s in sizes)


def flat_meshgrid(*sizes, device=None) -> list[torch.Tensor]:
    """``[t.reshape(-1) for t in torch.meshgrid(*map(torch.arange, sizes), indexing="ij")]``, by div/mod
    of one arange: meshgrid's broadcasting checks would pin symbolic (exported) sizes."""
    total = 1
    for n in sizes:
        total = total * n
    i = torch.arange(total, device=device)
    out = []
    for n in reversed(sizes[1:]):
        q = i.div(n, rounding_mode="floor")
        out.append(i - q * n)  # not ``i % n``: the ONNX converter has no remainder by a symbolic size
        i = q
    return [i, *reversed(out)]


def crop_to_map(t: torch.Tensor, grid: Grid, height, width) -> torch.Tensor:
    """(B, rows * cols, C) tokens of a padded grid -> (B, C, height, width), the map's real pixels.

    Under a dynamic-shape export the crop is a gather of the real pixels (a slice would need the guard
    ``height <= rows``, which the exporter cannot prove for ceil-rounded sizes).
    """
    if not symbolic_sizes(height, width):
        return rearrange(t, "b (h w) c -> b c h w", h=grid.rows)[..., :height, :width]
    r, c = flat_meshgrid(height, width, device=t.device)
    return rearrange(t.index_select(1, r * grid.cols + c), "b (h w) c -> b c h w", h=height)


def window_tile(
    size: int | tuple[int, int],
    height: int,
    width: int,
    dilation: int | tuple[int, int] = 1,
    *,
    tile: int = 8,
) -> tuple[int, int]:
    """A default query tile (th, tw) for :func:`window_segment` on an ``height x width`` map.

    ``tile`` x ``tile`` queries (8 x 8 measured best on CPU for k = 3 .. 15: each tile gathers a halo of
    (8 + k - 1)^2 keys), clipped to the map's extent per dilation phase so small maps are not padded far out
    (not under a dynamic-shape export, :func:`symbolic_sizes`: the padding is masked, the keys are the same).
    ``size`` is accepted for callers that tune the tile to the window.
    """
    dh, dw = _pair(dilation)
    if symbolic_sizes(height, width):  # a fixed tile: min() would pin the exported sizes
        return tile, tile
    return min(tile, ceil_div(height, dh)), min(tile, ceil_div(width, dw))


def window_segment(
    grid: Grid,
    size: int | tuple[int, int],
    dilation: int | tuple[int, int] = 1,
    *,
    tile: tuple[int, int],
    causal: bool = False,
    device=None,
) -> Segment:
    """The (kh x kw) neighbourhood of every query with dilation (dh, dw): keys at
    ``(r + dh * a, c + dw * b)``, ``|a| <= kh // 2``, ``|b| <= kw // 2`` (odd sizes).

    Queries are tiled per dilation phase (``r mod dh``, ``c mod dw``) into ``th x tw`` tiles of that phase
    (DiNAT's trick: a dilated window is an undilated window on the phase sub-grid), and each tile gathers
    its halo of ``(th + kh - 1) x (tw + kw - 1)`` keys. Out-of-grid halo slots are empty; out-of-map keys
    are removed by the grid's validity. ``causal=True`` only drops halo rows that are entirely in the
    future (the causal mask itself is the pattern's). ``grid.rows`` / ``grid.cols`` must be multiples of
    ``th * dh`` / ``tw * dw`` (pad the map with :func:`visattn.layers.pad_to_multiple`).
    """
    kh, kw = _pair(size)
    dh, dw = _pair(dilation)
    th, tw = _pair(tile)
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"window_segment: window size must be odd, got {(kh, kw)}")
    if grid.rows % (th * dh) or grid.cols % (tw * dw):
        raise ValueError(
            f"window_segment: grid {grid.rows}x{grid.cols} is not a multiple of tile * dilation "
            f"{(th * dh, tw * dw)}"
        )
    rh, rw = kh // 2, kw // 2
    ph, pw = grid.rows // dh, grid.cols // dw
    # Tile-major flat index arithmetic without broadcasting between symbolic sizes (exportable).
    up = 0 if causal else rh  # halo rows below the tile
    a, b, tr, tc, u, v = flat_meshgrid(dh, dw, ph // th, pw // tw, th, tw, device=device)
    queries = (((tr * th + u) * dh + a) * grid.cols + (tc * tw + v) * dw + b).reshape(-1, th * tw)
    a, b, tr, tc, hu, hv = flat_meshgrid(dh, dw, ph // th, pw // tw, th + up + rh, tw + 2 * rw, device=device)
    k_u, k_v = tr * th + hu - rh, tc * tw + hv - rw
    inside = (k_u >= 0) & (k_u < ph) & (k_v >= 0) & (k_v < pw)
    keys = torch.where(inside, (k_u * dh + a) * grid.cols + k_v * dw + b, -1).reshape(queries.shape[0], -1)
    u, v = flat_meshgrid(th, tw, device=device)
    hu, hv = flat_meshgrid(th + up + rh, tw + 2 * rw, device=device)
    member = ((hu[None, None, :] - rh - u[None, :, None]).abs() <= rh) & (
        (hv[None, None, :] - rw - v[None, :, None]).abs() <= rw
    )
    return Segment(queries, keys, member)


def row_segment(
    grid: Grid, offsets: tuple[int, ...] = (0,), *, radius: int | None = None, device=None
) -> Segment:
    """Tiles = grid rows; every row ``r`` gathers the rows ``r + o`` for ``o`` in ``offsets``.

    ``radius`` keeps only keys within that raster distance ``|p_key - p_query| <= radius`` (Sparse
    Transformer's "previous l positions" band with ``offsets=(-1, 0[, 1])``, ``radius=cols``).
    Jukebox: row = ``(0,)``, previous row = ``(-1,)``.
    """
    rows, cols = grid.rows, grid.cols
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(cols, device=device)[None, :]
    queries = r * cols + c
    parts = []
    for o in offsets:
        src = r + o
        parts.append(torch.where((src >= 0) & (src < rows), src * cols + c, -1))
    keys = torch.cat(parts, dim=1)
    member = None
    if radius is not None:
        member = (keys[:, None, :] - queries[:, :, None]).abs() <= radius
    return Segment(queries, keys, member, in_order=True)


def column_segment(grid: Grid, *, min_row_distance: int = 0, device=None) -> Segment:
    """Tiles = grid columns; every query attends its column, at row distance >= ``min_row_distance``
    (``2`` leaves rows r-1, r, r+1 to a raster band segment, so the two stay disjoint)."""
    rows, cols = grid.rows, grid.cols
    r = torch.arange(rows, device=device)
    queries = r[None, :] * cols + torch.arange(cols, device=device)[:, None]
    member = None
    if min_row_distance > 0:
        member = ((r[None, :] - r[:, None]).abs() >= min_row_distance)[None]
    return Segment(queries, queries, member)


def shared_segment(grid: Grid, keys: torch.Tensor) -> Segment:
    """Every query attends the same key-table indices ``keys`` (K,) (global tokens, summary positions).

    Tiles are the grid rows; refine ``member`` (via :func:`segment_coords`) to exclude keys another
    segment already covers.
    """
    rows, cols = grid.rows, grid.cols
    queries = torch.arange(grid.n, device=keys.device).reshape(rows, cols)
    return Segment(queries, keys.reshape(1, -1).expand(rows, -1), in_order=True)


def block_segment(grid: Grid, block: int | tuple[int, int], key_blocks: torch.Tensor) -> Segment:
    """Query tiles = ``bh x bw`` blocks of the grid in block-raster order; tile ``t`` attends every token of
    the blocks listed in ``key_blocks[t]`` ((T, Kb) block ids, -1 = none; repeated ids must be removed
    first, see :func:`first_occurrence`). The grid must be a multiple of the block."""
    bh, bw = _pair(block)
    if grid.rows % bh or grid.cols % bw:
        raise ValueError(f"block_segment: grid {grid.rows}x{grid.cols} is not a multiple of block {(bh, bw)}")
    device = key_blocks.device
    tr, tc, u, v = flat_meshgrid(grid.rows // bh, grid.cols // bw, bh, bw, device=device)
    pix = ((tr * bh + u) * grid.cols + tc * bw + v).reshape(-1, bh * bw)
    keys = torch.where(key_blocks[..., None] >= 0, pix[key_blocks.clamp_min(0)], -1).flatten(1)
    return Segment(pix, keys)


def with_shared_keys(seg: Segment, keys: torch.Tensor) -> Segment:
    """``seg`` with the key-table indices ``keys`` (E,) appended to every tile, attended by every query."""
    t, q = seg.queries.shape
    k = seg.keys.shape[1]
    new_keys = torch.cat([seg.keys, keys.reshape(1, -1).expand(t, -1)], dim=1)
    if seg.member is None:
        return seg._replace(keys=new_keys)
    shared = torch.ones(t, q, keys.numel(), dtype=torch.bool, device=keys.device)
    return seg._replace(keys=new_keys, member=torch.cat([seg.member.expand(t, q, k), shared], dim=2))


def segment_coords(grid: Grid, seg: Segment):
    """((q_row, q_col) (T, Q), (k_row, k_col) (T, K)) grid coordinates; extra tokens / empty slots: -1."""
    q_r, q_c = seg.queries // grid.cols, seg.queries % grid.cols
    is_grid = (seg.keys >= 0) & (seg.keys < grid.n)
    k_r = torch.where(is_grid, seg.keys // grid.cols, -1)
    k_c = torch.where(is_grid, seg.keys % grid.cols, -1)
    return (q_r, q_c), (k_r, k_c)


# ------------------------------------------------------------------------------------------ masks


def _key_table(pattern: Pattern, device) -> tuple[torch.Tensor, torch.Tensor]:
    valid = pattern.grid.valid(device)
    pos = torch.arange(pattern.grid.n, device=device)
    if pattern.extra:
        valid = torch.cat([valid, torch.ones(pattern.extra, dtype=torch.bool, device=device)])
        epos = pattern.extra_pos
        if epos is None:
            epos = torch.full((pattern.extra,), -1, dtype=torch.long, device=device)
        pos = torch.cat([pos, epos.to(device=device, dtype=torch.long)])
    return valid, pos


def segment_masks(pattern: Pattern) -> list[torch.Tensor]:
    """Per segment, the final (T, Q, K) bool mask: member & non-empty slot & valid key & (causal) past."""
    device = pattern.segments[0].keys.device
    valid, pos = _key_table(pattern, device)
    # Under torch.compile each mask is one opaque op (not under export: the graph must stay portable).
    # Inductor would inline the (T, K) key-validity gather ``valid[keys]`` into every (T, Q, K) loop that
    # reads the mask (the softmax's empty-row test and the additive float mask, each a scalar indirect load
    # with a bounds check per element): gmat's 64x64 forward+backward spent ~20% of its time there.
    opaque = torch.compiler.is_compiling() and not is_exporting()
    mask = _segment_mask_op if opaque else _segment_mask
    return [mask(seg.queries, seg.keys, seg.member, valid, pos, pattern.causal) for seg in pattern.segments]


def _segment_mask(queries, keys, member, valid, pos, causal: bool) -> torch.Tensor:
    """One segment's (T, Q, K) mask of :func:`segment_masks` (an expanded view where it broadcasts)."""
    k = keys.clamp_min(0)
    m = ((keys >= 0) & valid[k])[:, None, :]
    if member is not None:
        m = m & member
    if causal:
        m = m & (pos[k][:, None, :] <= queries[:, :, None])
    return m.expand(queries.shape[0], queries.shape[1], keys.shape[1])


@torch.library.custom_op("visattn::segment_mask", mutates_args=())
def _segment_mask_op(
    queries: torch.Tensor,
    keys: torch.Tensor,
    member: torch.Tensor | None,
    valid: torch.Tensor,
    pos: torch.Tensor,
    causal: bool,
) -> torch.Tensor:
    """:func:`_segment_mask` as a custom op (see :func:`segment_masks`); a fresh contiguous tensor."""
    return _segment_mask(queries, keys, member, valid, pos, causal).contiguous()


@_segment_mask_op.register_fake
def _segment_mask_fake(queries, keys, member, valid, pos, causal):
    return queries.new_empty((queries.shape[0], queries.shape[1], keys.shape[1]), dtype=torch.bool)


def dense_mask(pattern: Pattern) -> torch.Tensor:
    """The explicit (N, N + E) bool mask of ``pattern`` — O(N^2), FOR TESTS ONLY.

    Raises ValueError when two segments give the same key to the same query (segments must be disjoint)
    or a tile lists a key twice.
    """
    n = pattern.grid.n
    device = pattern.segments[0].keys.device
    count = torch.zeros(n, n + pattern.extra, dtype=torch.long, device=device)
    for seg, m in zip(pattern.segments, segment_masks(pattern), strict=True):
        q = seg.queries[:, :, None].expand_as(m)
        k = seg.keys.clamp_min(0)[:, None, :].expand_as(m)
        count.index_put_((q[m], k[m]), torch.ones_like(q[m]), accumulate=True)
    if (count > 1).any():
        raise ValueError(
            "dense_mask: a query gets the same key twice (segments overlap or a tile repeats a key)"
        )
    return count > 0


# -------------------------------------------------------------------------------------- attention


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Token-major (N, BH, d) gathered by (T, K) indices -> (T, BH, K, d)."""
    tt, kk = idx.shape
    return t.index_select(0, idx.reshape(-1)).view(tt, kk, t.shape[1], t.shape[2]).transpose(1, 2)


def _expand_bias(bias: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """(T|1, heads|1, Q|1, K) per-head bias -> (T|1, B*heads, Q|1, K) (batch-major heads like the tokens)."""
    t, _, q, k = bias.shape
    return (
        bias.expand(t, heads, q, k).unsqueeze(1).expand(t, batch, heads, q, k).reshape(t, batch * heads, q, k)
    )


# --------------------------------------------------------------------------------------- backends

BACKENDS = ("auto", "reference", "flex")
_ENV = "VISATTN_SPARSE_BACKEND"
# The process-wide setting; the environment variable gives its initial value (checked on first use).
_backend_setting = os.environ.get(_ENV, "auto")


def _check_backend(name, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(
            f"{where}: unknown sparse-attention backend {name!r}; choose one of {', '.join(BACKENDS)}"
        )
    return name


def get_backend() -> str:
    """The sparse-pattern engine's backend setting: ``"auto"``, ``"reference"`` or ``"flex"``."""
    return _check_backend(_backend_setting, f"visattn.layers.sparse_pattern (environment variable {_ENV})")


class backend:
    """Set the sparse-pattern engine's backend (``"auto"``, ``"reference"`` or ``"flex"``).

    ``backend("flex")`` sets it for the process; ``with backend("reference"): ...`` sets it for a block of
    code and restores the previous setting on exit. ``VISATTN_SPARSE_BACKEND`` gives the initial value.
    ``"auto"``: FlexAttention on CUDA where it can run fused, the reference path everywhere else;
    ``"reference"``: always the gathered-tile path; ``"flex"``: FlexAttention wherever it can run (on CPU
    an unfused inference-only reference: see :func:`choose_backend`). The setting is process-wide, not
    per thread.
    """

    def __init__(self, name: str) -> None:
        global _backend_setting
        _check_backend(name, "visattn.layers.sparse_pattern.backend")
        self.previous, self.name = _backend_setting, name
        _backend_setting = name

    def __enter__(self) -> backend:
        return self

    def __exit__(self, *exc) -> None:
        global _backend_setting
        _backend_setting = self.previous


def _flex_runs_fused(compiled: bool) -> bool:
    """FlexAttention importable, and either inside torch.compile or with Triton to compile it ourselves."""
    from .flex_backend import flex_available

    if not flex_available():
        return False
    if compiled:
        return True
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def choose_backend(device, requires_grad: bool, compiled: bool, *, exporting: bool = False) -> str:
    """The one place that picks the engine's backend: ``"flex"`` or ``"reference"``.

    Args:
        device: device of the queries.
        requires_grad: the call records a graph for backward.
        compiled: the call is traced by ``torch.compile``.
        exporting: the call is traced by ``torch.export`` (always the reference path: the exported graph
            must stay portable, e.g. to ONNX).
    Rules (setting from :class:`backend`): ``"reference"`` -> reference. ``"auto"`` -> flex only on CUDA
    when FlexAttention runs fused there (inside ``torch.compile``, or Triton available to compile it);
    CPU, training or not, stays on the reference path. ``"flex"`` -> flex, except that FlexAttention has no
    backward on CPU: a CPU call that needs gradients raises ValueError instead of silently training on
    another path.
    """
    setting = get_backend()
    if exporting or setting == "reference":
        return "reference"
    device = torch.device(device)
    if setting == "auto":
        return "flex" if device.type == "cuda" and _flex_runs_fused(compiled) else "reference"
    from .flex_backend import flex_available

    if not flex_available():
        raise ValueError(
            "sparse_attention: backend 'flex' needs torch.nn.attention.flex_attention, which this torch "
            f"({torch.__version__}) lacks; use backend('auto') or backend('reference')"
        )
    if device.type == "cpu" and requires_grad:
        raise ValueError(
            "sparse_attention: backend 'flex' has no backward on CPU (FlexAttention runs CPU inference "
            "only); train on CPU with backend('auto') or backend('reference'), or run under torch.no_grad()"
        )
    return "flex"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    heads: int,
    *,
    scale: float | None = None,
    bias: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Multi-head softmax attention of every grid query over its key set in ``pattern``.

    Args:
        q: (B, N, C) queries in grid raster order (N = grid.rows * grid.cols).
        k, v: (B, N + E, C) keys and values of the key table (grid tokens, then extra tokens).
        pattern: the key sets (:class:`Pattern`).
        heads: number of heads (C divisible by heads).
        scale: score scale, default 1 / sqrt(C / heads).
        bias: optional per-segment additive score bias, each broadcastable to (T, heads, Q, K) (e.g. a
            relative-position bias looked up with :func:`segment_coords`), or None.
    Returns:
        (B, N, C). Queries covered by no segment or without any valid key get 0.

    The computation runs on the backend :func:`choose_backend` picks (the gathered-tile reference path
    below, or FlexAttention, :mod:`visattn.layers.flex_backend`); both give the same result.
    """
    batch, n, _ = q.shape
    if n != pattern.grid.n or k.shape[1] != n + pattern.extra:
        raise ValueError(
            f"sparse_attention: expected {pattern.grid.n} queries and {pattern.grid.n + pattern.extra} keys, "
            f"got {n} and {k.shape[1]}"
        )
    needs_grad = torch.is_grad_enabled() and (
        q.requires_grad
        or k.requires_grad
        or v.requires_grad
        or (bias is not None and any(b is not None and b.requires_grad for b in bias))
    )
    which = choose_backend(q.device, needs_grad, torch.compiler.is_compiling(), exporting=is_exporting())
    if which == "flex":
        from .flex_backend import flex_sparse_attention

        return flex_sparse_attention(q, k, v, pattern, heads, scale=scale, bias=bias)
    qt, kt, vt = (rearrange(t, "b n (h d) -> n (b h) d", h=heads) for t in (q, k, v))
    d = qt.shape[-1]
    scale = d**-0.5 if scale is None else scale
    masks = segment_masks(pattern)
    bias = [None] * len(masks) if bias is None else list(bias)
    if len(pattern.segments) == 1:
        out = _attend_one(qt, kt, vt, pattern.segments[0], masks[0], scale, bias[0], batch, heads)
    else:
        out = _attend_joint(qt, kt, vt, pattern.segments, masks, scale, bias, batch, heads)
    return rearrange(out, "n (b h) d -> b n (h d)", b=batch)


def _attend_one(qt, kt, vt, seg, mask, scale, bias, batch, heads):
    """One tiling: one SDPA over (T, B*heads, Q, K) with the tile masks."""
    t, q = seg.queries.shape
    nonempty = mask.any(-1, keepdim=True)
    # A query with no key gets one arbitrary slot (finite, no NaN in backward) and is zeroed after.
    safe = mask | ~nonempty
    if bias is None:
        attn_mask = safe[:, None]
    else:
        attn_mask = _expand_bias(bias, batch, heads).masked_fill(~safe[:, None], float("-inf"))
    keys = seg.keys.clamp_min(0)
    o = F.scaled_dot_product_attention(
        _gather(qt, seg.queries), _gather(kt, keys), _gather(vt, keys), attn_mask=attn_mask, scale=scale
    )
    if is_exporting():
        # The traced reshape below must not depend on SDPA's output strides (the fused CPU kernel returns
        # a (T, Q, BH, d) layout, its decomposition for ONNX a contiguous one): make them canonical.
        o = o.clone(memory_format=torch.contiguous_format)
    o = (o * nonempty[:, None].to(o.dtype)).transpose(1, 2).reshape(t * q, *o.shape[1:2], o.shape[-1])
    if seg.in_order:
        return o
    # Gather each grid position's slot (slot T*Q: a zero row for positions no tile holds), not index_copy:
    # a query listed by two tiles (Big Bird's global patches on a map of fewer patches than globals) then
    # gets its output, and its gradient, once.
    flat = seg.queries.reshape(-1)
    slot = torch.full((qt.shape[0],), flat.shape[0], dtype=flat.dtype, device=flat.device)
    slot = slot.scatter(0, flat, torch.arange(flat.shape[0], device=flat.device))
    return torch.cat([o, o.new_zeros(1, *o.shape[1:])]).index_select(0, slot)


def _attend_joint(qt, kt, vt, segments, masks, scale, bias, batch, heads):
    """Several tilings: per-segment scores, rearranged per query, one masked softmax over all of them."""
    n = qt.shape[0]
    scores, query_masks, gathered, perms = [], [], [], []
    for seg, m, b in zip(segments, masks, bias, strict=False):
        t, q = seg.queries.shape
        if t * q != n:
            raise ValueError("sparse_attention: with several segments every segment must tile all queries")
        keys = seg.keys.clamp_min(0)
        vk = _gather(vt, keys)
        s = _gather(qt, seg.queries) @ _gather(kt, keys).transpose(-1, -2) * scale  # (T, BH, Q, K)
        if b is not None:
            s = s + _expand_bias(b, batch, heads)
        flat = inv = None
        s = s.transpose(1, 2).reshape(n, s.shape[1], s.shape[-1])  # (N, BH, K), tile order
        m = m.reshape(n, 1, m.shape[-1])
        if not seg.in_order:  # to raster order
            flat = seg.queries.reshape(-1)
            inv = torch.empty_like(flat).scatter_(0, flat, torch.arange(n, device=flat.device))
            s, m = s[inv], m[inv]
        scores.append(s)
        query_masks.append(m)
        gathered.append(vk)
        perms.append((flat, inv, t, q))
    s = torch.cat(scores, dim=-1)
    m = torch.cat(query_masks, dim=-1)
    p = torch.softmax(s.masked_fill(~m, torch.finfo(s.dtype).min), dim=-1) * m.any(-1, keepdim=True)
    out = None
    for part, vk, (flat, inv, t, q) in zip(
        p.split([x.shape[-1] for x in scores], dim=-1), gathered, perms, strict=False
    ):
        part = part if flat is None else part[flat]
        tiles = part.reshape(t, q, *part.shape[1:]).transpose(1, 2).to(vk.dtype)  # (T, BH, Q, K)
        o = (tiles @ vk).transpose(1, 2).reshape(n, *vk.shape[1:2], vk.shape[-1])
        o = o if inv is None else o[inv]
        out = o if out is None else out + o
    return out


class PatternAttention(nn.Module):
    """q/k/v projections, :func:`sparse_attention` over a :class:`Pattern`, output projection.

    The output projection is zero-initialised, so ``x + attn(x)`` is the identity at initialisation.
    ``forward(x, pattern, extra=None)``: ``x`` (B, N, C) grid tokens; ``extra`` (B, E, C) or (E, C) (shared
    by the batch) extra key tokens, projected by the same k/v and appended after the grid tokens;
    returns (B, N, C).
    """

    def __init__(self, dim: int, heads: int, *, qkv_bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"PatternAttention: dim ({dim}) must be divisible by heads ({heads})")
        dd = factory_kwargs(device, dtype)
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(
        self,
        x: torch.Tensor,
        pattern: Pattern,
        extra: torch.Tensor | None = None,
        *,
        bias: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        if extra is not None and extra.dim() == 2:
            extra = extra.expand(x.shape[0], -1, -1)
        context = x if extra is None else torch.cat([x, extra], dim=1)
        k, v = self.kv(context).chunk(2, dim=-1)
        return self.proj(sparse_attention(self.q(x), k, v, pattern, self.heads, bias=bias))
