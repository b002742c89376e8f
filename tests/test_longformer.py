"""Longformer in 2D: k x k (dilated) sliding window + learned global tokens, exactly."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map, raster_jacobian_support
from test_sparse_pattern import (
    dense_attention,
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
PIXELS = [(0, 0), (0, 5), (4, 0), (4, 5), (8, 10)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel_size,dilation", [(5, 1), (3, 2), (5, 2), (3, 3)])
def test_receptive_field_is_the_window(kernel_size, dilation, causal):
    block = build("longformer", C, kernel_size=kernel_size, dilation=dilation, num_global=0, causal=causal)
    for i, j in PIXELS:
        want = window_keys(i, j, H, W, kernel_size, dilation, causal)
        assert receptive_field(block, H, W, i, j, C) == want, (i, j)


def test_global_tokens_see_everything_but_never_leak_when_causal():
    block = build("longformer", C, kernel_size=3, num_global=2)
    for i, j in PIXELS:
        assert receptive_field(block, H, W, i, j, C) == set(range(H * W))
    block = build("longformer", C, kernel_size=3, num_global=2, causal=True)
    for i, j in PIXELS:
        assert receptive_field(block, H, W, i, j, C) == window_keys(i, j, H, W, 3, 1, True)


def _reference(block, x, window):
    """Dense float64 reference: globals read the whole map (Q_g, K_g, V_g), pixels attend window + globals."""
    t = to_tokens(x).double()
    g = block.global_tokens.double()[None].expand(x.shape[0], -1, -1)
    if not block.causal:
        ctx = torch.cat([t, g], dim=1)
        k, v = (ctx @ block.kv_g.weight.double().T + block.kv_g.bias.double()).chunk(2, dim=-1)
        q = g @ block.q_g.weight.double().T + block.q_g.bias.double()
        read = dense_attention(q, k, v, torch.ones(g.shape[1], ctx.shape[1], dtype=torch.bool), block.heads)
        g = g + read @ block.proj_g.weight.double().T + block.proj_g.bias.double()
    mask = torch.cat([window, torch.ones(window.shape[0], g.shape[1], dtype=torch.bool)], dim=1)
    attn = block.attn.double()
    out = pattern_attention_reference(attn, t, mask, g)
    attn.float()
    return x.double() + to_map(out, *x.shape[-2:])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "kwargs,hw", [({"kernel_size": 5, "dilation": 2, "num_global": 2}, (H, W)), ({}, (20, 23))]
)
def test_pattern_and_dense_equivalence(kwargs, hw, causal):
    h, w = hw
    block = build("longformer", C, causal=causal, **kwargs)
    k, d = block.kernel_size, block.dilation
    window = mask_from_sets(h * w, h * w, lambda p: window_keys(p // w, p % w, h, w, k, d, causal))
    got = map_mask(block.pattern(h, w), h, w)
    assert torch.equal(got[:, : h * w], window) and got[:, h * w :].all()
    x = feature_map(2, C, h, w)
    with torch.no_grad():
        torch.testing.assert_close(block(x).double(), _reference(block, x, window), atol=1e-5, rtol=1e-5)


def test_dilated_causal_variant_never_sees_the_future():
    block = build("longformer", C, kernel_size=3, dilation=2, num_global=1, causal=True).eval()
    support = raster_jacobian_support(block, C, 6, 7)
    assert not (support & torch.triu(torch.ones_like(support), diagonal=1)).any()
    assert (support & torch.tril(torch.ones_like(support), diagonal=-1)).any()


def test_saved_activations_grow_linearly():
    block = build("longformer", C, kernel_size=7).train()
    mem = [saved_activation_bytes(block, feature_map(1, C, s, s, requires_grad=True)) for s in (32, 64)]
    assert math.log(mem[1] / mem[0]) / math.log(4) <= 1.1


def test_invalid_hyperparameters_raise():
    for kwargs in ({"kernel_size": 4}, {"dilation": 0}, {"num_global": -1}, {"heads": 3}):
        with pytest.raises(ValueError, match="^longformer: "):
            build("longformer", C, **kwargs)
