"""The shared sparse-pattern engine (visattn.layers.sparse_pattern), against naive references.

Also holds the small reference helpers the sparse blocks' tests import (dense masked softmax, receptive
field by autograd).
"""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from helpers import build, feature_map

from visattn.bench import saved_activation_bytes
from visattn.layers.sparse_pattern import (
    Grid,
    Pattern,
    Segment,
    block_segment,
    ceil_div,
    column_segment,
    crop_to_map,
    dense_mask,
    first_occurrence,
    flat_meshgrid,
    pad_to_grid,
    row_segment,
    segment_coords,
    segment_masks,
    shared_segment,
    sparse_attention,
    window_segment,
    with_shared_keys,
)

# ------------------------------------------------------------------ reference helpers (imported by tests)


def dense_attention(q, k, v, mask, heads, bias=None):
    """softmax(q kᵀ / sqrt(d) + bias) v over an explicit (N, M) bool mask, float64; rows without keys -> 0."""
    qh, kh, vh = (rearrange(t.double(), "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    s = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
    if bias is not None:
        s = s + bias.double()
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return rearrange(p @ vh, "b h n d -> b n (h d)")


def pattern_attention_reference(attn, tokens, mask, extra=None):
    """What a PatternAttention computes, with an explicit dense mask: float64, (B, N, C)."""
    context = tokens if extra is None else torch.cat([tokens, extra.expand(tokens.shape[0], -1, -1)], dim=1)
    k, v = attn.kv(context).chunk(2, dim=-1)
    out = dense_attention(attn.q(tokens), k, v, mask, attn.heads)
    return out @ attn.proj.weight.double().T + attn.proj.bias.double()


def receptive_field(block, h, w, i, j, c):
    """Raster positions of the input pixels with a non-zero gradient on output pixel (i, j)."""
    x = feature_map(1, c, h, w, seed=1, requires_grad=True)
    weights = torch.randn(c, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((block(x)[0, :, i, j] * weights).sum(), x)
    return set((grad[0].abs().sum(0).flatten() > 0).nonzero().flatten().tolist())


def window_keys(i, j, h, w, k, d, causal):
    """Naive k x k neighbourhood with dilation d: raster positions."""
    r = k // 2
    out = set()
    for a in range(-r, r + 1):
        for b in range(-r, r + 1):
            y, x = i + a * d, j + b * d
            if 0 <= y < h and 0 <= x < w and (not causal or y * w + x <= i * w + j):
                out.add(y * w + x)
    return out


def map_mask(pattern, h, w):
    """dense_mask of a pattern built on a padded grid, restricted to the h x w map's raster positions
    (extra tokens kept as the last columns)."""
    g = pattern.grid
    if g.length is not None:  # a raster sequence padded at its end
        idx = torch.arange(h * w)
    else:
        idx = (torch.arange(h)[:, None] * g.cols + torch.arange(w)[None, :]).flatten()
    cols = torch.cat([idx, torch.arange(g.n, g.n + pattern.extra)])
    return dense_mask(pattern)[idx][:, cols]


def mask_from_sets(n, m, keys_of):
    mask = torch.zeros(n, m, dtype=torch.bool)
    for p in range(n):
        for q in keys_of(p):
            mask[p, q] = True
    return mask


# ---------------------------------------------------------------------------------------- engine tests


def _random_qkv(pattern, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, e = pattern.grid.n, pattern.extra
    return (
        torch.randn(2, n, c, generator=g),
        torch.randn(2, n + e, c, generator=g),
        torch.randn(2, n + e, c, generator=g),
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "size,dilation,tile,hw",
    [
        (3, 1, (4, 4), (9, 11)),
        (5, 1, (3, 4), (9, 11)),
        (3, 2, (3, 2), (9, 11)),
        (3, 3, (2, 4), (10, 7)),
        (7, 1, (5, 5), (6, 9)),
    ],
)
def test_window_segment_is_the_dilated_neighbourhood(size, dilation, tile, hw, causal):
    h, w = hw
    rows = -(-h // (tile[0] * dilation)) * tile[0] * dilation
    cols = -(-w // (tile[1] * dilation)) * tile[1] * dilation
    grid = Grid(rows, cols, h, w)
    pattern = Pattern(grid, (window_segment(grid, size, dilation, tile=tile, causal=causal),), causal)
    got = dense_mask(pattern)
    for p in range(grid.n):
        i, j = divmod(p, cols)
        if i >= h or j >= w:
            continue
        want = {(q // w) * cols + q % w for q in window_keys(i, j, h, w, size, dilation, causal)}
        assert set(got[p].nonzero().flatten().tolist()) == want, (i, j)


@pytest.mark.parametrize("causal", [False, True])
def test_row_band_and_column_segments(causal):
    grid = Grid(5, 7, length=31)
    band = row_segment(grid, (-1, 0, 1), radius=7)
    col = column_segment(grid, min_row_distance=2)
    got = dense_mask(Pattern(grid, (band, col), causal))  # also checks the two are disjoint
    for p in range(grid.n):
        want = {q for q in range(31) if (abs(p - q) <= 7 or (p - q) % 7 == 0) and (not causal or q <= p)}
        assert set(got[p].nonzero().flatten().tolist()) == want, p


def test_block_segment_and_first_occurrence():
    ids = torch.tensor([[3, 1, 3, -1, 1, 0], [2, 2, 2, 2, 5, -1]])
    assert first_occurrence(ids).tolist() == [
        [True, True, False, False, False, True],
        [True] + [False] * 3 + [True, False],
    ]
    grid = Grid(4, 6)  # 2 x 3 blocks of 2 x 2
    seg = block_segment(grid, 2, torch.tensor([[0, -1], [4, 1], [2, -1], [3, -1], [4, -1], [5, 0]]))
    got = dense_mask(Pattern(grid, (seg,)))
    block_of = lambda p: (p // 6 // 2) * 3 + (p % 6) // 2  # noqa: E731
    lists = {0: {0}, 1: {4, 1}, 2: {2}, 3: {3}, 4: {4}, 5: {5, 0}}
    for p in range(24):
        assert set(got[p].nonzero().flatten().tolist()) == {
            q for q in range(24) if block_of(q) in lists[block_of(p)]
        }


def test_dense_mask_rejects_overlapping_segments():
    grid = Grid(3, 4)
    with pytest.raises(ValueError, match="twice"):
        dense_mask(Pattern(grid, (row_segment(grid), column_segment(grid))))


def _patterns():
    g = Grid(8, 12, 7, 11)
    win = window_segment(g, 3, 2, tile=(4, 3))
    yield "window", Pattern(g, (win,))
    yield "window_causal", Pattern(g, (window_segment(g, 5, 1, tile=(4, 4), causal=True),), True)
    extra = torch.arange(g.n, g.n + 3)
    yield "window_extra", Pattern(g, (with_shared_keys(win, extra),), extra=3)
    yield (
        "window_extra_causal",
        Pattern(
            g,
            (with_shared_keys(window_segment(g, 3, 1, tile=(4, 4), causal=True), extra),),
            True,
            3,
            torch.tensor([-1, 20, 60]),
        ),
    )
    s = Grid(6, 5, length=27)
    yield "strided", Pattern(s, (row_segment(s, (-1, 0, 1), radius=5), column_segment(s, min_row_distance=2)))
    yield (
        "strided_causal",
        Pattern(s, (row_segment(s, (-1, 0), radius=5), column_segment(s, min_row_distance=2)), True),
    )
    summ = shared_segment(s, torch.tensor([3, 4, 8, 9, 13, 14, 18, 19, 23, 24]))
    (qr, _), (kr, _) = segment_coords(s, summ)
    summ = Segment(summ.queries, summ.keys, kr[:, None, :] != qr[:, :, None])
    yield "fixed_causal", Pattern(s, (row_segment(s), summ), True)
    yield "prev_row", Pattern(s, (row_segment(s, (-1,)),), True)
    b = Grid(6, 9, 5, 8)
    yield (
        "blocks",
        Pattern(
            b, (block_segment(b, 3, torch.tensor([[0, 1], [1, 4], [2, -1], [3, 0], [4, 5], [5, 2]])),), True
        ),
    )


@pytest.mark.parametrize("name,pattern", list(_patterns()), ids=[n for n, _ in _patterns()])
def test_sparse_attention_equals_dense_masked_softmax(name, pattern):
    q, k, v = (t.requires_grad_() for t in _random_qkv(pattern))
    mask = dense_mask(pattern)
    out = sparse_attention(q, k, v, pattern, heads=2)
    ref = dense_attention(q, k, v, mask, heads=2)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)


def test_bias_is_added_per_head_and_tile():
    g = Grid(8, 8)
    seg = window_segment(g, 3, 1, tile=(4, 4))
    pattern = Pattern(g, (seg,))
    q, k, v = _random_qkv(pattern)
    table = torch.randn(2, 9)
    (qr, qc), (kr, kc) = segment_coords(g, seg)
    rel = (
        ((kr[:, None, :] - qr[:, :, None]).clamp(-1, 1) + 1) * 3
        + (kc[:, None, :] - qc[:, :, None]).clamp(-1, 1)
        + 1
    )
    bias = table[:, rel].transpose(0, 1)  # (T, heads, Q, K)
    out = sparse_attention(q, k, v, pattern, heads=2, bias=[bias])
    dense_bias = torch.zeros(2, g.n, g.n)
    for p in range(g.n):
        for qq in range(g.n):
            dy, dx = qq // 8 - p // 8, qq % 8 - p % 8
            if abs(dy) <= 1 and abs(dx) <= 1:
                dense_bias[:, p, qq] = table[:, (dy + 1) * 3 + dx + 1]
    ref = dense_attention(q, k, v, dense_mask(pattern), 2, bias=dense_bias)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # Joint path (two segments) with the same bias on the window part.
    s2 = Pattern(g, (seg, shared_segment(g, torch.tensor([], dtype=torch.long))))
    torch.testing.assert_close(
        sparse_attention(q, k, v, s2, heads=2, bias=[bias, None]), out, atol=1e-5, rtol=1e-5
    )


def test_queries_without_keys_give_zero_and_finite_gradients():
    g = Grid(4, 5)
    for pattern in (
        Pattern(g, (row_segment(g, (-1,)),)),
        Pattern(g, (row_segment(g, (-1,)), column_segment(g, min_row_distance=9))),
    ):
        q, k, v = (t.requires_grad_() for t in _random_qkv(pattern))
        out = sparse_attention(q, k, v, pattern, heads=2)
        assert out[:, :5].abs().max() == 0 and out[:, 5:].abs().min() > 0
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_saved_memory_grows_linearly_for_windows_and_as_n_sqrt_n_for_lines():
    def measure(make, sizes):
        out = []
        for s in sizes:
            pattern = make(s)
            q, k, v = (t.requires_grad_() for t in _random_qkv(pattern, c=16))
            out.append(saved_activation_bytes(sparse_attention, q, k, v, pattern, heads=2))
        return math.log(out[1] / out[0]) / math.log(4)

    def window(s):
        g = Grid(s, s)
        return Pattern(g, (window_segment(g, 7, 1, tile=(8, 8)),))

    def strided(s):
        g = Grid(s, s)
        return Pattern(g, (row_segment(g, (-1, 0, 1), radius=s), column_segment(g, min_row_distance=2)))

    assert measure(window, (32, 64)) <= 1.05
    assert measure(strided, (16, 32)) <= 1.6


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,bound",
    [("sparse_transformer", 1.6), ("jukebox", 1.6), ("longformer", 1.1), ("bigbird", 1.1), ("diet", 1.1)],
)
def test_block_saved_activations_at_64_and_128(name, bound):
    """The issue's sizes (C = 64): window patterns <= 1.1, strided / row-column <= 1.6."""
    block = build(name, 64).train()
    mem = [saved_activation_bytes(block, feature_map(1, 64, s, s, requires_grad=True)) for s in (64, 128)]
    assert math.log(mem[1] / mem[0]) / math.log(4) <= bound


# ------------------------------------------------------------------------- export-friendly helpers


def test_first_occurrence_equals_a_stable_sort_without_one():
    """The unique-key sort (ONNX has no stable sort) keeps exactly the first slot of every value >= 0."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 6, (50, 9), generator=g)
    want = [[v >= 0 and v not in row[:i] for i, v in enumerate(row)] for row in ids.tolist()]
    assert first_occurrence(ids).tolist() == want
    assert first_occurrence(ids[:, :1]).tolist() == [[v >= 0] for v in ids[:, 0].tolist()]


@pytest.mark.parametrize("sizes", [(3,), (2, 5), (1, 4, 3), (2, 1, 3, 2)])
def test_flat_meshgrid_and_ceil_div(sizes):
    ref = [t.reshape(-1) for t in torch.meshgrid(*(torch.arange(n) for n in sizes), indexing="ij")]
    for a, b in zip(flat_meshgrid(*sizes), ref, strict=True):
        assert torch.equal(a, b)
    assert [ceil_div(a, b) for a in range(0, 20) for b in (1, 2, 3, 8)] == [
        math.ceil(a / b) for a in range(0, 20) for b in (1, 2, 3, 8)
    ]


def test_pad_to_grid_and_crop_to_map_round_trip():
    x = torch.randn(2, 3, 5, 7)
    assert pad_to_grid(x, 5, 7) is x
    xp = pad_to_grid(x, 8, 9)
    assert xp.shape == (2, 3, 8, 9) and xp[..., 5:, :].abs().max() == 0 and xp[..., 7:].abs().max() == 0
    tokens = rearrange(xp, "b c h w -> b (h w) c")
    assert torch.equal(crop_to_map(tokens, Grid(8, 9, 5, 7), 5, 7), x)


def test_a_query_listed_twice_gets_its_output_and_gradient_once():
    """Big Bird's global patches repeat on maps of fewer patches than globals: the engine's scatter of tile
    outputs must count a repeated query once, in the forward and in the backward pass."""
    g = Grid(4, 4)
    keys = torch.arange(16)[None].expand(3, -1)
    once = Pattern(g, (Segment(torch.tensor([[0, 1], [8, 9]]), keys[:2]),))
    twice = Pattern(g, (Segment(torch.tensor([[0, 1], [8, 9], [0, 1]]), keys),))
    q, k, v = (t.requires_grad_() for t in _random_qkv(once))
    a, b = sparse_attention(q, k, v, once, heads=2), sparse_attention(q, k, v, twice, heads=2)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    w = torch.randn_like(a)
    for ga, gb in zip(
        torch.autograd.grad((a * w).sum(), (q, k, v)),
        torch.autograd.grad((b * w).sum(), (q, k, v)),
        strict=True,
    ):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-6)
    assert a[:, [2, 3, 4, 10]].abs().max() == 0  # positions no tile holds


@pytest.mark.parametrize("name", ["diet", "longformer", "bigbird"])
def test_blocks_export_with_dynamic_height_and_width(name):
    """torch.export (as the ONNX exporter calls it) with symbolic H, W: one program for every map size,
    including sizes with other tile counts than the example and maps smaller than one tile."""
    block = build(name, 16).eval()
    dims = {"x": {2: torch.export.Dim("h", min=1, max=512), 3: torch.export.Dim("w", min=1, max=512)}}
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(block, (feature_map(2, 16, 16, 20),), dynamic_shapes=dims, strict=False)
    for hw in [(16, 20), (13, 9), (3, 2), (40, 17)]:
        x = feature_map(2, 16, *hw, seed=hw[0])
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), block(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,pattern", list(_patterns()), ids=[n for n, _ in _patterns()])
def test_segment_mask_op_equals_eager_masks(name, pattern):
    from visattn.layers.sparse_pattern import _key_table, _segment_mask_fake, _segment_mask_op

    valid, pos = _key_table(pattern, None)
    for seg, ref in zip(pattern.segments, segment_masks(pattern), strict=True):
        args = (seg.queries, seg.keys, seg.member, valid, pos, pattern.causal)
        got = _segment_mask_op(*args)
        assert got.dtype == torch.bool and got.is_contiguous() and torch.equal(got, ref)
        fake = _segment_mask_fake(*args)  # what the compiler plans for: the real shape and dtype
        assert fake.shape == got.shape and fake.dtype == got.dtype


def test_masks_are_one_opaque_op_per_segment_under_compile_not_under_export():
    """Under torch.compile the (T, Q, K) mask is one custom op per segment, so inductor cannot inline the
    key-validity gather into every loop over the mask; an exported graph keeps plain aten ops (ONNX)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    block = build("gmat", 16).train()
    x = feature_map(1, 16, 9, 11)
    torch.compile(block, fullgraph=True, backend=backend)(x)
    torch._dynamo.reset()
    assert ["segment_mask" in str(n.target) for n in graphs[0].graph.nodes].count(True) == 1
    exported = torch.export.export(block.eval(), (x,))
    assert not any("segment_mask" in str(n.target) for n in exported.graph.nodes)
