"""GMAT in 2D: k x k window + M dense global memory tokens (written, then read), against naive loops."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map
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


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
def test_receptive_field_is_the_window_without_memory(kernel_size):
    block = build("gmat", C, kernel_size=kernel_size, num_memory=0)
    for i, j in PIXELS:
        assert receptive_field(block, H, W, i, j, C) == window_keys(i, j, H, W, kernel_size, 1, False), (i, j)


def test_memory_reads_and_writes_the_whole_map():
    block = build("gmat", C, kernel_size=3, num_memory=4)
    for i, j in PIXELS:
        assert receptive_field(block, H, W, i, j, C) == set(range(H * W))


def _reference(block, x):
    """Float64 GMAT: the memory attends densely to [memory; pixels] with the layer's projections, then every
    pixel attends its window and the written memory (one softmax)."""
    b, c, h, w = x.shape
    attn = block.attn.double()
    t = to_tokens(x).double()
    k = block.kernel_size
    window = mask_from_sets(h * w, h * w, lambda p: window_keys(p // w, p % w, h, w, k, 1, False))
    extra = None
    if block.num_memory:
        m = block.memory.double()[None].expand(b, -1, -1)
        ctx = torch.cat([m, t], dim=1)
        kk, v = attn.kv(ctx).chunk(2, dim=-1)
        full = torch.ones(m.shape[1], ctx.shape[1], dtype=torch.bool)
        extra = m + attn.proj(dense_attention(attn.q(m), kk, v, full, block.heads))
        window = torch.cat([window, torch.ones(h * w, m.shape[1], dtype=torch.bool)], dim=1)
    out = pattern_attention_reference(attn, t, window, extra)
    block.attn.float()
    return x.double() + to_map(out, h, w)


@pytest.mark.parametrize(
    "kwargs,hw",
    [
        ({"kernel_size": 5, "num_memory": 3}, (H, W)),
        ({}, (20, 23)),
        ({"num_memory": 0, "kernel_size": 3}, (6, 5)),
    ],
)
def test_pattern_and_dense_equivalence(kwargs, hw):
    h, w = hw
    block = build("gmat", C, **kwargs).eval()
    k = block.kernel_size
    window = mask_from_sets(h * w, h * w, lambda p: window_keys(p // w, p % w, h, w, k, 1, False))
    got = map_mask(block.pattern(h, w), h, w)
    assert torch.equal(got[:, : h * w], window) and got[:, h * w :].all()
    assert got.shape[1] == h * w + block.num_memory
    x = feature_map(2, C, h, w)
    with torch.no_grad():
        torch.testing.assert_close(block(x).double(), _reference(block, x), atol=1e-5, rtol=1e-5)


def test_saved_activations_grow_linearly():
    block = build("gmat", C, kernel_size=7).train()
    mem = [saved_activation_bytes(block, feature_map(1, C, s, s, requires_grad=True)) for s in (32, 64)]
    assert math.log(mem[1] / mem[0]) / math.log(4) <= 1.1


@pytest.mark.slow
def test_saved_activations_at_64_and_128():
    """The issue's sizes (C = 64): exponent <= 1.1 (window)."""
    block = build("gmat", 64).train()
    mem = [saved_activation_bytes(block, feature_map(1, 64, s, s, requires_grad=True)) for s in (64, 128)]
    assert math.log(mem[1] / mem[0]) / math.log(4) <= 1.1


def test_invalid_hyperparameters_raise():
    for kwargs in ({"kernel_size": 4}, {"kernel_size": 0}, {"num_memory": -1}, {"heads": 3}):
        with pytest.raises(ValueError, match="^gmat: "):
            build("gmat", C, **kwargs)
