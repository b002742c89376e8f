"""FlexAttention backend of the sparse-pattern engine (:mod:`visattn.layers.sparse_pattern`).

:func:`flex_sparse_attention` computes exactly what :func:`~visattn.layers.sparse_pattern.sparse_attention`
computes (same key sets, scale, per-head bias, zero output for queries without keys), with one
``torch.nn.attention.flex_attention`` call over the whole key table instead of gathered per-tile SDPA.

How a :class:`~visattn.layers.sparse_pattern.Pattern` becomes a ``BlockMask`` (:func:`flex_plan`):

- The attended (query, key) pairs come from the pattern's segment masks (member, empty slots, validity,
  causality already applied), so every pattern the engine accepts is served, extra/global tokens included
  (they are the last ``E`` key positions, after the grid tokens).
- Token order: FlexAttention skips work per (query block x key block) tile of ``block_size`` tokens. In
  raster order a 2D window of a query block spans a few full map rows (many partly used key blocks);
  ordered by ``th x tw`` tiles of the map (NATTEN's layout), a query block is a compact patch whose window
  touches few key blocks. The plan counts the non-empty blocks of both orders and keeps the sparser one
  (raster on ties: no permutation). The grid tokens are permuted into that order before the call and the
  output permuted back; extra tokens stay last.
- The mask inside a block is a table lookup: ``slot[q // bs, kv // bs]`` names the block's bit tile,
  ``bits[slot, q % bs, kv % bs]`` the pair. Memory is O(non-empty blocks * bs^2), linear in N for local
  patterns, never N^2. Blocks whose pairs are all attended are passed as *full* blocks (no mask_mod).
- A per-segment bias becomes a ``score_mod`` reading a table laid out like ``bits`` (built per call from
  the bias tensors, so learned biases get gradients where FlexAttention has a backward).

Plans are cached per (device, block size, grid, causal flag, extra count, segment shapes); a hit is
confirmed by comparing the cached index tensors with the new ones (``torch.equal``), so a rebuilt but
identical pattern (blocks rebuild theirs every forward) reuses the plan and a different one never does.

FlexAttention runs fused (Triton) only compiled on CUDA: on CUDA this module calls a ``torch.compile``d
``flex_attention`` (or the plain one inside a caller's compiled region). On CPU it runs the uncompiled
forward, a slow unfused reference that materialises the scores, and has no backward at all, which is why
the backend choice (:func:`visattn.layers.sparse_pattern.choose_backend`) keeps CPU on the reference path.
Inside a caller's ``torch.compile`` the plan lookup is a graph break (it runs eagerly, once per pattern);
on CPU with inductor, torch 2.14's CPU flex template fails to lower these block masks (a LoweringException),
so compiled CPU inference with ``backend("flex")`` works with dynamo's ``eager`` backend only.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from einops import rearrange

__all__ = ["FlexPlan", "cache_clear", "cache_info", "flex_available", "flex_plan", "flex_sparse_attention"]

DEFAULT_BLOCK_SIZE = 128  # FlexAttention's sparse block on CUDA
_CACHE_SIZE = 16  # shape keys
_BUCKET_SIZE = 4  # patterns per shape key


def flex_available() -> bool:
    """True when ``torch.nn.attention.flex_attention`` can be imported."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class FlexPlan:
    """A pattern lowered to FlexAttention, for one device and block size.

    Attributes:
        block_mask: the ``BlockMask`` (batch and heads broadcast: the pattern is the same for all).
        order: (N,) grid positions in the order given to FlexAttention, or None for raster order.
        rank: (N,) inverse of ``order`` (position of each raster token in that order), or None.
        tile: the ``(th, tw)`` token tile of ``order``, or None for raster order.
        slot: (q blocks, kv blocks) int, index of each block's bit tile (the last tile is all False).
        bits: (slots + 1, bs, bs) bool, the attended pairs inside each non-empty block.
        pair_dst: (slot, q offset, kv offset) of every attended pair, per segment (for bias tables).
        pair_src: (tile, query slot, key slot) of the same pairs in the segment's (T, Q, K) layout.
        blocks: number of non-empty (query block, key block) tiles; ``full``: how many of them are full.
    """

    block_mask: object
    order: torch.Tensor | None
    rank: torch.Tensor | None
    tile: tuple[int, int] | None
    slot: torch.Tensor
    bits: torch.Tensor
    pair_dst: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    pair_src: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    blocks: int
    full: int


class _Entry:
    __slots__ = ("tensors", "plan")

    def __init__(self, tensors, plan) -> None:
        self.tensors, self.plan = tensors, plan


_cache: OrderedDict = OrderedDict()
_stats = {"hits": 0, "misses": 0}


def cache_info() -> dict:
    """{'hits', 'misses', 'size'} of the plan cache (size: cached plans), for tests and benchmarks."""
    return {**_stats, "size": sum(len(b) for b in _cache.values())}


def cache_clear() -> None:
    """Empty the plan cache and reset its counters."""
    _cache.clear()
    _stats.update(hits=0, misses=0)


def _identity_tensors(pattern) -> list[torch.Tensor | None]:
    out = []
    for seg in pattern.segments:
        out += [seg.queries, seg.keys, seg.member]
    out.append(pattern.extra_pos)
    return out


def _cache_key(pattern, device, block_size):
    shapes = tuple(
        None if t is None else (tuple(t.shape), t.dtype, t.device) for t in _identity_tensors(pattern)
    )
    return (torch.device(device), block_size, tuple(pattern.grid), pattern.causal, pattern.extra, shapes)


def _same(a: list, b: list) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b, strict=True)
    )


@torch.compiler.disable
def flex_plan(pattern, device=None, block_size: int = DEFAULT_BLOCK_SIZE) -> FlexPlan:
    """The cached :class:`FlexPlan` of ``pattern`` (built on first use, see the module docstring).

    Runs eagerly even inside ``torch.compile`` (a graph break): the plan is data-dependent bookkeeping
    done once per pattern, and the cached ``BlockMask`` then feeds the compiled ``flex_attention``.
    """
    device = pattern.segments[0].keys.device if device is None else torch.device(device)
    key = _cache_key(pattern, device, block_size)
    tensors = _identity_tensors(pattern)
    # Patterns of equal shapes (Jukebox's row and previous-row patterns) share a bucket.
    bucket = _cache.get(key, [])
    for entry in bucket:
        if _same(entry.tensors, tensors):
            _cache.move_to_end(key)
            _stats["hits"] += 1
            return entry.plan
    _stats["misses"] += 1
    plan = _build_plan(pattern, device, block_size)
    bucket = [
        *bucket[-(_BUCKET_SIZE - 1) :],
        _Entry([None if t is None else t.detach().clone() for t in tensors], plan),
    ]
    _cache[key] = bucket
    _cache.move_to_end(key)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return plan


def _pairs(pattern):
    """Attended (query position, key index) pairs and their (tile, q slot, k slot), per segment."""
    from .sparse_pattern import segment_masks

    out = []
    for seg, m in zip(pattern.segments, segment_masks(pattern), strict=True):
        t, qq, kk = m.nonzero(as_tuple=True)
        out.append((seg.queries[t, qq], seg.keys[t, kk], (t, qq, kk)))
    return out


def _tile_order(rows: int, cols: int, tile: tuple[int, int], device) -> torch.Tensor:
    """Grid positions sorted by (tile row, tile col, row in tile, col in tile) for ``tile`` = (th, tw)."""
    th, tw = tile
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(cols, device=device)[None, :]
    tiles_per_row = -(-cols // tw)
    key = ((r // th) * tiles_per_row + c // tw) * (th * tw) + (r % th) * tw + c % tw
    return key.reshape(-1).argsort()


def _tile_candidates(rows: int, cols: int, bs: int) -> list[tuple[int, int]]:
    """Square-ish power-of-two tiles of ``bs`` tokens that fit the grid's width (NATTEN-like)."""
    out = []
    tw = 1 << max(0, (int(math.isqrt(bs)) - 1).bit_length())  # the power of two >= sqrt(bs)
    for w in (tw, tw // 2, tw * 2):
        if 1 <= w < cols and bs % w == 0 and bs // w > 1:
            out.append((bs // w, w))
    return out


def _block_ids(qi, ki, rank, n, nkb, bs):
    qp = qi if rank is None else rank[qi]
    kp = ki if rank is None else torch.where(ki < n, rank[ki.clamp_max(n - 1)], ki)
    return qp, kp, (qp // bs) * nkb + kp // bs


def _build_plan(pattern, device, bs: int) -> FlexPlan:
    from torch.nn.attention.flex_attention import BlockMask

    grid = pattern.grid
    n, m = grid.n, grid.n + pattern.extra
    nqb, nkb = -(-n // bs), -(-m // bs)
    pairs = [
        (qi.to(device), ki.to(device), tuple(s.to(device) for s in src)) for qi, ki, src in _pairs(pattern)
    ]
    qi = torch.cat([p[0] for p in pairs])
    ki = torch.cat([p[1] for p in pairs])

    # Pick the token order with the fewest non-empty blocks (raster wins ties: nothing to permute).
    best = (torch.unique(_block_ids(qi, ki, None, n, nkb, bs)[2]).numel(), None, None)
    for tile in _tile_candidates(grid.rows, grid.cols, bs):
        order = _tile_order(grid.rows, grid.cols, tile, device)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=device))
        count = torch.unique(_block_ids(qi, ki, rank, n, nkb, bs)[2]).numel()
        if count < best[0]:
            best = (count, tile, (order, rank))
    _, tile, perm = best
    order, rank = (None, None) if perm is None else perm

    qp, kp, bid = _block_ids(qi, ki, rank, n, nkb, bs)
    uniq, slot_of_pair = torch.unique(bid, return_inverse=True)
    nslots = uniq.numel()
    bits = torch.zeros(nslots + 1, bs, bs, dtype=torch.bool, device=device)
    bits[slot_of_pair, qp % bs, kp % bs] = True
    slot = torch.full((nqb * nkb,), nslots, dtype=torch.int32, device=device)
    slot[uniq] = torch.arange(nslots, dtype=torch.int32, device=device)
    slot = slot.view(nqb, nkb)

    # Full blocks: every pair attended and the block wholly inside both sequences (a partial edge block
    # keeps its mask_mod, so padding positions are never taken as attended).
    qb, kb = uniq // nkb, uniq % nkb
    inside = ((qb + 1) * bs <= n) & ((kb + 1) * bs <= m)
    is_full = bits[:nslots].flatten(1).all(1) & inside
    partial = torch.zeros(nqb * nkb, dtype=torch.bool, device=device)
    full = torch.zeros(nqb * nkb, dtype=torch.bool, device=device)
    partial[uniq[~is_full]] = True
    full[uniq[is_full]] = True

    def ordered(dense):
        dense = dense.view(1, 1, nqb, nkb)
        num = dense.sum(-1, dtype=torch.int32)
        idx = dense.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
        return num, idx

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)

    def mask_mod(b, h, q_idx, kv_idx):
        return bits[slot[q_idx // bs, kv_idx // bs], q_idx % bs, kv_idx % bs]

    block_mask = BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(n, m)
    )
    offsets = torch.tensor([0] + [p[0].numel() for p in pairs], device=device).cumsum(0).tolist()
    pair_dst, pair_src = [], []
    for i, p in enumerate(pairs):
        a, b = offsets[i], offsets[i + 1]
        pair_dst.append((slot_of_pair[a:b], qp[a:b] % bs, kp[a:b] % bs))
        pair_src.append(p[2])
    return FlexPlan(
        block_mask=block_mask,
        order=order,
        rank=rank,
        tile=tile,
        slot=slot,
        bits=bits,
        pair_dst=pair_dst,
        pair_src=pair_src,
        blocks=nslots,
        full=int(is_full.sum()),
    )


def _bias_table(plan: FlexPlan, bias, pattern, heads: int, dtype) -> torch.Tensor | None:
    """(slots + 1, bs, bs, heads) additive scores laid out like ``plan.bits`` (0 where no bias)."""
    if bias is None or all(b is None for b in bias):
        return None
    table = plan.bits.new_zeros(plan.bits.shape + (heads,), dtype=dtype)
    dst_s, dst_q, dst_k, vals = [], [], [], []
    for seg, b, dst, (t, qq, kk) in zip(pattern.segments, bias, plan.pair_dst, plan.pair_src, strict=False):
        if b is None:
            continue
        tt, q = seg.queries.shape
        full = b.expand(tt, heads, q, seg.keys.shape[1])
        vals.append(full[t, :, qq, kk].to(dtype))  # (pairs, heads)
        dst_s.append(dst[0])
        dst_q.append(dst[1])
        dst_k.append(dst[2])
    return table.index_put((torch.cat(dst_s), torch.cat(dst_q), torch.cat(dst_k)), torch.cat(vals))


_compiled_flex = None


def _flex_fn(device: torch.device):
    """The ``flex_attention`` to call: compiled on CUDA (the fused kernel), plain elsewhere or when the
    caller is already being compiled (dynamo then inlines the plain one)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern,
    heads: int,
    *,
    scale: float | None = None,
    bias: list[torch.Tensor | None] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """:func:`~visattn.layers.sparse_pattern.sparse_attention` computed by FlexAttention.

    Same arguments and result ((B, N, C), heads split as ``(h d)``, default scale 1 / sqrt(C / heads),
    queries without keys -> 0). ``block_size``: FlexAttention's sparse block (128 on CUDA; smaller blocks
    only make sense in tests that exercise many blocks on tiny maps).
    """
    n = pattern.grid.n
    plan = flex_plan(pattern, q.device, block_size)
    qh, kh, vh = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    scale = qh.shape[-1] ** -0.5 if scale is None else scale
    if plan.order is not None:
        qh = qh.index_select(2, plan.order)
        kv_order = torch.cat([plan.order, torch.arange(n, k.shape[1], device=q.device)])
        kh, vh = kh.index_select(2, kv_order), vh.index_select(2, kv_order)
    table = _bias_table(plan, bias, pattern, heads, qh.dtype)
    score_mod = None
    if table is not None:
        bits_slot, bs = plan.slot, plan.bits.shape[-1]

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[bits_slot[q_idx // bs, kv_idx // bs], q_idx % bs, kv_idx % bs, h]

    out = _flex_fn(q.device)(qh, kh, vh, score_mod=score_mod, block_mask=plan.block_mask, scale=scale)
    if plan.rank is not None:
        out = out.index_select(2, plan.rank)
    return rearrange(out, "b h n d -> b n (h d)")
