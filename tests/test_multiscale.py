"""Multi-scale Transformer (retina) in 2D: fine window + rings of mean-pooled tokens, against naive loops."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map, raster_jacobian_support
from test_bpt import cell_pixels, naive_cells, naive_depth, naive_field, naive_mask
from test_sparse_pattern import pattern_attention_reference, receptive_field

from visattn.bench import saved_activation_bytes
from visattn.layers import to_map, to_tokens

C = 16
H, W = 9, 11
PIXELS = [(0, 0), (0, 5), (4, 0), (4, 5), (8, 10), (5, 7)]


@pytest.mark.parametrize("radius", [1, 2])
def test_receptive_field_of_the_fine_window(radius):
    """levels=1: the pixels of the 2(2r+1)-square of 2 x 2 blocks around the query's block."""
    block = build("multiscale", C, radius=radius, levels=1)
    for i, j in PIXELS:
        want = {
            y * W + x
            for y in range(H)
            for x in range(W)
            if abs(y // 2 - i // 2) <= radius and abs(x // 2 - j // 2) <= radius
        }
        assert receptive_field(block, H, W, i, j, C) == want, (i, j)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("radius,levels", [(1, None), (1, 2), (2, None)])
def test_receptive_field_is_the_retina(radius, levels, causal):
    """Each scale adds its ring; all scales cover the map. Causal: a pooled token only once complete."""
    block = build("multiscale", C, radius=radius, levels=levels, causal=causal)
    depth = naive_depth(H, W, radius) if levels is None else min(levels, naive_depth(H, W, radius))
    for i, j in PIXELS:
        want = naive_field(i, j, H, W, radius, depth, causal)
        assert receptive_field(block, H, W, i, j, C) == want, (i, j)
        if levels is None and not causal:
            assert want == set(range(H * W))


def _reference(block, x):
    """Float64 retina: naive mean-pooled cells, naive key sets, dense masked softmax."""
    b, c, h, w = x.shape
    depth = naive_depth(h, w, block.radius)
    if block.levels is not None:
        depth = min(depth, block.levels)
    flat = x.double().flatten(2)
    cells = [flat[:, :, sorted(cell_pixels(*cl, h, w))].mean(-1) for cl in naive_cells(h, w, depth)]
    extra = torch.stack(cells, 1) if cells else None
    mask = naive_mask(h, w, block.radius, depth, block.causal)
    attn = block.attn.double()
    out = pattern_attention_reference(attn, to_tokens(x).double(), mask, extra)
    block.attn.float()
    return x.double() + to_map(out, h, w)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "kwargs,hw",
    [({}, (H, W)), ({"radius": 1}, (16, 12)), ({"radius": 1, "levels": 2}, (13, 7)), ({}, (3, 2))],
)
def test_equals_dense_softmax_with_the_pattern_as_mask(kwargs, hw, causal):
    block = build("multiscale", C, causal=causal, **kwargs).eval()
    x = feature_map(2, C, *hw)
    with torch.no_grad():
        torch.testing.assert_close(block(x).double(), _reference(block, x), atol=1e-5, rtol=1e-5)


def test_causal_pooling_never_leaks_the_future():
    block = build("multiscale", C, radius=1, causal=True).eval()
    support = raster_jacobian_support(block, C, 8, 9)
    assert not (support & torch.triu(torch.ones_like(support), diagonal=1)).any()
    assert support[8 * 9 - 1, 0]  # the far corner, through a complete coarse token


def test_saved_activations_grow_as_n_log_n():
    """One more scale per doubling of the side: about 1.1 (keys gathered per 8 x 8 tile: 600 -> 700)."""
    block = build("multiscale", C).train()
    mem = [saved_activation_bytes(block, feature_map(1, C, s, s, requires_grad=True)) for s in (32, 64)]
    assert math.log(mem[1] / mem[0]) / math.log(4) <= 1.15


@pytest.mark.slow
def test_saved_activations_at_64_and_128():
    """The issue's sizes (C = 64): exponent <= 1.1 (N log N)."""
    block = build("multiscale", 64).train()
    mem = [saved_activation_bytes(block, feature_map(1, 64, s, s, requires_grad=True)) for s in (64, 128)]
    assert math.log(mem[1] / mem[0]) / math.log(4) <= 1.1


def test_invalid_hyperparameters_raise():
    for kwargs in ({"radius": 0}, {"levels": 0}, {"heads": 3}):
        with pytest.raises(ValueError, match="^multiscale: "):
            build("multiscale", C, **kwargs)
