"""Sparse Transformer: strided and fixed factorised patterns on the raster sequence, exactly."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map, raster_jacobian_support
from test_sparse_pattern import map_mask, mask_from_sets, pattern_attention_reference, receptive_field

from visattn.bench import saved_activation_bytes
from visattn.layers import to_map, to_tokens

C = 16
H, W = 9, 11
PIXELS = [(0, 0), (0, 5), (4, 0), (4, 5), (8, 10)]


def paper_keys(p, n, l, kind, c, causal):
    """Child et al. 2019, sec. 4.2: strided A1 = previous l positions (|i - j| <= l bidirectionally),
    A2 = every l-th position; fixed A1 = own block of l, A2 = last c positions of every block."""
    if kind == "strided":
        keys = {q for q in range(n) if abs(p - q) <= l or (p - q) % l == 0}
    else:
        keys = {q for q in range(n) if q // l == p // l or q % l >= l - c}
    return {q for q in keys if q <= p} if causal else keys


CONFIGS = [
    ("strided", None, 8),
    ("strided", 4, 8),
    ("fixed", None, 2),
    ("fixed", 5, 2),
    ("fixed", None, 8),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,stride,summary", CONFIGS)
def test_receptive_field_is_the_paper_pattern(kind, stride, summary, causal):
    block = build("sparse_transformer", C, pattern=kind, stride=stride, summary=summary, causal=causal)
    l = W if stride is None else stride
    for i, j in PIXELS:
        p = i * W + j
        want = paper_keys(p, H * W, l, kind, min(summary, l), causal) | {p}
        assert receptive_field(block, H, W, i, j, C) == want, (i, j)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,stride,summary", CONFIGS)
def test_pattern_of_every_pixel_and_dense_equivalence(kind, stride, summary, causal):
    block = build("sparse_transformer", C, pattern=kind, stride=stride, summary=summary, causal=causal)
    l = W if stride is None else stride
    n = H * W
    want = mask_from_sets(n, n, lambda p: paper_keys(p, n, l, kind, min(summary, l), causal))
    assert torch.equal(map_mask(block.pattern(H, W), H, W), want)
    x = feature_map(2, C, H, W)
    ref = x.double() + to_map(pattern_attention_reference(block.attn, to_tokens(x), want), H, W)
    with torch.no_grad():
        torch.testing.assert_close(block(x).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,stride", [("fixed", None), ("strided", 3), ("fixed", 4)])
def test_causal_variants_never_see_the_future(kind, stride):
    block = build("sparse_transformer", C, pattern=kind, stride=stride, summary=2, causal=True).eval()
    support = raster_jacobian_support(block, C, 5, 7)
    assert not (support & torch.triu(torch.ones_like(support), diagonal=1)).any()
    assert (support & torch.tril(torch.ones_like(support), diagonal=-1)).any()


@pytest.mark.parametrize("kind", ["strided", "fixed"])
def test_saved_activations_grow_at_most_as_n_sqrt_n(kind):
    block = build("sparse_transformer", C, pattern=kind).train()
    mem = [saved_activation_bytes(block, feature_map(1, C, s, s, requires_grad=True)) for s in (16, 32)]
    assert math.log(mem[1] / mem[0]) / math.log(4) <= 1.6


def test_invalid_hyperparameters_raise():
    for kwargs in ({"pattern": "dense"}, {"stride": 0}, {"summary": 0}, {"heads": 3}):
        with pytest.raises(ValueError, match="^sparse_transformer: "):
            build("sparse_transformer", C, **kwargs)
