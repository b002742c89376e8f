"""Transformer on a Diet (dilated): the dilated k x k neighbourhood, exactly, and nothing dense."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map, raster_jacobian_support
from test_sparse_pattern import (
    map_mask,
    mask_from_sets,
    pattern_attention_reference,
    receptive_field,
    window_keys,
)

from visattn.bench import saved_activation_bytes
from visattn.layers import to_map, to_tokens

C = 16
H, W = 9, 11
PIXELS = [(0, 0), (0, 5), (4, 0), (4, 5), (8, 10)]  # corners, edges, interior


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_receptive_field_is_the_dilated_3x3_neighbourhood(dilation, causal):
    block = build("diet", C, dilation=dilation, causal=causal)
    for i, j in PIXELS:
        assert receptive_field(block, H, W, i, j, C) == window_keys(i, j, H, W, 3, dilation, causal), (i, j)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel_size,dilation", [(3, 2), (5, 1), (3, 4)])
def test_pattern_of_every_pixel_and_dense_equivalence(kernel_size, dilation, causal):
    block = build("diet", C, kernel_size=kernel_size, dilation=dilation, causal=causal)
    want = mask_from_sets(
        H * W, H * W, lambda p: window_keys(p // W, p % W, H, W, kernel_size, dilation, causal)
    )
    assert torch.equal(map_mask(block.pattern(H, W), H, W), want)
    x = feature_map(2, C, H, W)
    ref = x.double() + to_map(pattern_attention_reference(block.attn, to_tokens(x), want), H, W)
    with torch.no_grad():
        torch.testing.assert_close(block(x).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dilation", [2, 3])
def test_dilated_causal_variant_never_sees_the_future(dilation):
    block = build("diet", C, dilation=dilation, causal=True).eval()
    support = raster_jacobian_support(block, C, 6, 7)
    assert not (support & torch.triu(torch.ones_like(support), diagonal=1)).any()
    assert (support & torch.tril(torch.ones_like(support), diagonal=-1)).any()


def test_saved_activations_grow_linearly():
    block = build("diet", C, dilation=2).train()
    mem = [saved_activation_bytes(block, feature_map(1, C, s, s, requires_grad=True)) for s in (32, 64)]
    assert math.log(mem[1] / mem[0]) / math.log(4) <= 1.1


def test_invalid_hyperparameters_raise():
    for kwargs in ({"kernel_size": 4}, {"dilation": 0}, {"heads": 5}):
        with pytest.raises(ValueError, match="^diet: "):
            build("diet", C, **kwargs)
