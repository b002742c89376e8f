"""BP-Transformer in 2D (quadtree interaction lists, cells attend to their children), against naive loops.

Also holds the naive quadtree reference that tests/test_multiscale.py imports.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map, raster_jacobian_support
from test_sparse_pattern import dense_attention, receptive_field

from visattn.bench import saved_activation_bytes
from visattn.layers.sparse_pattern import dense_mask
from visattn.layers.sparse_pyramid import Pyramid, pyramid_pattern

C = 16
H, W = 9, 11
PIXELS = [(0, 0), (0, 5), (4, 0), (4, 5), (8, 10), (5, 7)]  # corners, edges, interior

# ------------------------------------------------------------------ naive quadtree reference (imported)


def naive_depth(h, w, r):
    depth = 1
    while math.ceil(h / 2**depth) > r + 1 or math.ceil(w / 2**depth) > r + 1:
        depth += 1
    return depth


def naive_cells(h, w, depth):
    """[(level, a, b)] of levels 1 .. depth - 1 in key-table order (level by level, row-major)."""
    return [
        (lv, a, b)
        for lv in range(1, depth)
        for a in range(math.ceil(h / 2**lv))
        for b in range(math.ceil(w / 2**lv))
    ]


def cell_pixels(lv, a, b, h, w):
    s = 2**lv
    return {y * w + x for y in range(a * s, min((a + 1) * s, h)) for x in range(b * s, min((b + 1) * s, w))}


def naive_keys(i, j, h, w, r, depth, causal):
    """Keys of pixel (i, j) as (level, a, b): level 0 = the pixels of the children of the parent's
    r-neighbourhood; level l = children of the parent's r-neighbourhood that are not r-neighbours."""
    keys = set()
    for lv in range(depth):
        s = 2**lv
        for a in range(math.ceil(h / s)):
            for b in range(math.ceil(w / s)):
                near_parent = max(abs(a // 2 - (i >> (lv + 1))), abs(b // 2 - (j >> (lv + 1)))) <= r
                own = max(abs(a - (i >> lv)), abs(b - (j >> lv)))
                if not near_parent or (lv > 0 and own <= r):
                    continue
                if causal and max(cell_pixels(lv, a, b, h, w)) > i * w + j:
                    continue
                keys.add((lv, a, b))
    return keys


def naive_field(i, j, h, w, r, depth, causal):
    out = set()
    for key in naive_keys(i, j, h, w, r, depth, causal):
        out |= cell_pixels(*key, h, w)
    return out


def naive_mask(h, w, r, depth, causal):
    """(H*W, H*W + cells) bool mask over [pixels (raster); cells (naive_cells order)]."""
    cells = {c: h * w + n for n, c in enumerate(naive_cells(h, w, depth))}
    mask = torch.zeros(h * w, h * w + len(cells), dtype=torch.bool)
    for p in range(h * w):
        for lv, a, b in naive_keys(p // w, p % w, h, w, r, depth, causal):
            mask[p, a * w + b if lv == 0 else cells[(lv, a, b)]] = True
    return mask


def pattern_on_map(pattern, h, w):
    """dense_mask of a pyramid pattern restricted to the real pixels (cells kept as the last columns)."""
    g = pattern.grid
    idx = (torch.arange(h)[:, None] * g.cols + torch.arange(w)[None, :]).flatten()
    return dense_mask(pattern)[idx][:, torch.cat([idx, torch.arange(g.n, g.n + pattern.extra)])]


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hw,r", [((9, 11), 1), ((16, 16), 1), ((13, 7), 2), ((5, 30), 1), ((1, 1), 1)])
def test_pyramid_pattern_is_the_interaction_list(hw, r, causal):
    h, w = hw
    pyr = Pyramid.of(h, w, r)
    assert pyr.depth == naive_depth(h, w, r)
    got = pattern_on_map(pyramid_pattern(pyr, causal=causal).pattern, h, w)
    assert torch.equal(got, naive_mask(h, w, r, pyr.depth, causal))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hw,r", [((9, 11), 1), ((5, 30), 1), ((1, 1), 2)])
def test_levels_beyond_the_full_pyramid_are_empty(hw, r, causal):
    """A dynamic-shape export builds the pyramid of the largest admitted map; on a smaller map the extra
    levels must add no key, so the key sets are the full pyramid's."""
    h, w = hw
    depth = naive_depth(h, w, r)
    got = pattern_on_map(pyramid_pattern(Pyramid(h, w, r, depth + 3), causal=causal).pattern, h, w)
    want = naive_mask(h, w, r, depth, causal)
    assert torch.equal(got[:, : want.shape[1]], want) and not got[:, want.shape[1] :].any()


@pytest.mark.parametrize("name", ["bpt", "multiscale"])
def test_blocks_with_deeper_pyramids_are_unchanged(name, monkeypatch):
    """With the export's deeper pyramid (cells, relative keys, pooled tokens) the blocks are unchanged."""
    block = build(name, C, causal=True).eval()
    x = feature_map(2, C, 7, 12)
    with torch.no_grad():
        ref = block(x)
    full = Pyramid.of.__func__

    def deeper(cls, h, w, r, levels=None):
        pyr = full(cls, h, w, r, levels)
        return pyr._replace(depth=pyr.depth + 2)

    monkeypatch.setattr(Pyramid, "of", classmethod(deeper))
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bpt", "multiscale"])
def test_blocks_export_with_dynamic_height_and_width(name):
    """One exported program (symbolic H, W as the ONNX exporter traces) for small and large maps."""
    block = build(name, C).eval()
    dims = {"x": {2: torch.export.Dim("h", min=1, max=256), 3: torch.export.Dim("w", min=1, max=256)}}
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(block, (feature_map(2, C, 16, 20),), dynamic_shapes=dims, strict=False)
    for hw in [(16, 20), (13, 9), (1, 1), (64, 80), (33, 7)]:
        x = feature_map(2, C, *hw, seed=hw[0])
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), block(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hw,r", [((9, 11), 1), ((16, 16), 1), ((13, 7), 2), ((33, 17), 2)])
def test_levels_tile_the_map_exactly_once(hw, r):
    """Fine near, coarse far, no gap and no overlap: every pixel is in exactly one key of every query."""
    h, w = hw
    depth = naive_depth(h, w, r)
    for i, j in [(0, 0), (h - 1, w - 1), (h // 2, w // 3)]:
        count = torch.zeros(h * w, dtype=torch.long)
        for key in naive_keys(i, j, h, w, r, depth, False):
            count[list(cell_pixels(*key, h, w))] += 1
        assert (count == 1).all()
        per_level = [sum(k[0] == lv for k in naive_keys(i, j, h, w, r, depth, False)) for lv in range(depth)]
        assert (
            per_level[0] <= (2 * (2 * r + 1)) ** 2 and max(per_level[1:], default=0) <= 3 * (2 * r + 1) ** 2
        )


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2])
def test_receptive_field_is_the_ancestors_neighbourhood(k, levels):
    """Levels 0 .. m-1 together cover exactly the pixels of N_m: |y>>m - i>>m|, |x>>m - j>>m| <= k."""
    block = build("bpt", C, k=k, levels=levels)
    for i, j in PIXELS:
        want = {
            y * W + x
            for y in range(H)
            for x in range(W)
            if abs((y >> levels) - (i >> levels)) <= k and abs((x >> levels) - (j >> levels)) <= k
        }
        assert receptive_field(block, H, W, i, j, C) == want, (i, j)


@pytest.mark.parametrize("causal", [False, True])
def test_receptive_field_full_pyramid(causal):
    """Full pyramid: the whole map; causal: only the past, minus the pixels of incomplete cells."""
    block = build("bpt", C, k=1, causal=causal)
    depth = naive_depth(H, W, 1)
    for i, j in PIXELS:
        want = naive_field(i, j, H, W, 1, depth, causal)
        assert receptive_field(block, H, W, i, j, C) == want, (i, j)
        if not causal:
            assert want == set(range(H * W))
        else:
            assert max(want) == i * W + j
    # The price of causal cells: pixel (4, 10) does not see (4, 0) (its level-2 cell holds rows 4..7).
    assert 4 * W not in naive_field(4, 10, H, W, 1, depth, True)


def _reference(block, x):
    """Float64 BPT: naive bottom-up cells and key sets, relative keys per (level, offset), dense softmax."""
    b, c, h, w = x.shape
    heads, d, k = block.heads, c // block.heads, block.k
    depth = naive_depth(h, w, k)
    xd = x.double()
    state = {(0, y, z): xd[:, :, y, z] for y in range(h) for z in range(w)}
    for lv, a, bb in naive_cells(h, w, depth):
        kids = [
            state[(lv - 1, 2 * a + u, 2 * bb + v)]
            for u in (0, 1)
            for v in (0, 1)
            if (lv - 1, 2 * a + u, 2 * bb + v) in state
        ]
        kids = torch.stack(kids, -1).view(b, heads, d, -1)  # (B, heads, d, children)
        query = block.up_query[min(lv, block.clip_levels) - 1].double()
        weight = torch.softmax(torch.einsum("bndc,nd->bnc", kids, query) / math.sqrt(d), -1)
        state[(lv, a, bb)] = torch.einsum("bnc,bndc->bnd", weight, kids).reshape(b, c)
    cells = naive_cells(h, w, depth)
    tokens = torch.stack([state[(0, p // w, p % w)] for p in range(h * w)] + [state[cl] for cl in cells], 1)
    lin = lambda m, t: t @ m.weight.double().T + (0 if m.bias is None else m.bias.double())  # noqa: E731
    q = lin(block.attn.q, tokens[:, : h * w])
    kk, v = lin(block.attn.kv, tokens).chunk(2, dim=-1)
    mask = naive_mask(h, w, k, depth, block.causal)
    keys = [(0, p // w, p % w) for p in range(h * w)] + cells
    labels = torch.zeros(h * w, len(keys), dtype=torch.long)
    rr, span = 2 * k + 1, 4 * k + 3
    for p in range(h * w):
        for n, (lv, a, bb) in enumerate(keys):
            if mask[p, n]:
                dy, dx = a - ((p // w) >> lv), bb - ((p % w) >> lv)
                assert abs(dy) <= rr and abs(dx) <= rr
                labels[p, n] = min(lv, block.clip_levels - 1) * span**2 + (dy + rr) * span + dx + rr
    qh = q.view(b, h * w, heads, d).transpose(1, 2)  # (B, heads, N, d)
    a_lab = block.rel_key.double()[labels]  # (N, M, d)
    bias = torch.einsum("bhnd,nmd->bhnm", qh, a_lab) / math.sqrt(d)
    out = lin(block.attn.proj, dense_attention(q, kk, v, mask, heads, bias=bias))
    return xd + out.transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "kwargs,hw", [({}, (H, W)), ({"k": 2, "heads": 2}, (13, 7)), ({"clip_levels": 2}, (16, 12))]
)
def test_equals_dense_softmax_with_the_pattern_as_mask(kwargs, hw, causal):
    block = build("bpt", C, causal=causal, **kwargs).eval()
    x = feature_map(2, C, *hw)
    with torch.no_grad():
        torch.testing.assert_close(block(x).double(), _reference(block, x), atol=1e-5, rtol=1e-5)


def test_without_relative_keys_equals_reference_with_zero_table():
    block = build("bpt", C, rel_pos=False).eval()
    ref = build("bpt", C).eval()
    ref.load_state_dict(block.state_dict(), strict=False)
    with torch.no_grad():
        ref.rel_key.zero_()
        x = feature_map(2, C, H, W)
        torch.testing.assert_close(block(x), ref(x), atol=1e-5, rtol=1e-5)


def test_causal_cells_never_leak_the_future():
    block = build("bpt", C, k=1, causal=True).eval()
    support = raster_jacobian_support(block, C, 8, 9)
    assert not (support & torch.triu(torch.ones_like(support), diagonal=1)).any()
    # Far past pixels reach the last pixel only through coarse cells: they are visible.
    assert support[8 * 9 - 1, 0] and support[8 * 9 - 1, 8]


def test_saved_activations_grow_about_linearly():
    block = build("bpt", C).train()
    mem = [saved_activation_bytes(block, feature_map(1, C, s, s, requires_grad=True)) for s in (32, 64)]
    assert math.log(mem[1] / mem[0]) / math.log(4) <= 1.1


@pytest.mark.slow
def test_saved_activations_at_64_and_128():
    """The issue's sizes (C = 64): exponent <= 1.1 (N log N)."""
    block = build("bpt", 64).train()
    mem = [saved_activation_bytes(block, feature_map(1, 64, s, s, requires_grad=True)) for s in (64, 128)]
    assert math.log(mem[1] / mem[0]) / math.log(4) <= 1.1


def test_invalid_hyperparameters_raise():
    for kwargs in ({"k": 0}, {"levels": 0}, {"clip_levels": 0}, {"heads": 3}):
        with pytest.raises(ValueError, match="^bpt: "):
            build("bpt", C, **kwargs)
