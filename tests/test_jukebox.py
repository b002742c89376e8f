"""Jukebox factored attention: row, column and previous-row steps, exactly, in the paper's cycle."""

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


def paper_keys(p, kind, causal, h=H, w=W):
    """block_ctx = W: block = row, transpose block = column, previous block = previous row."""
    i, j = divmod(p, w)
    if kind == "row":
        keys = {i * w + c for c in range(w)}
    elif kind == "column":
        keys = {r * w + j for r in range(h)}
    else:
        keys = {(i - 1) * w + c for c in range(w)} if i > 0 else set()
    return {q for q in keys if q <= p} if causal else keys


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["row", "column", "prev_row"])
def test_receptive_field_of_one_step_is_the_paper_pattern(kind, causal):
    block = build("jukebox", C, attn_order=(kind,), causal=causal)
    for i, j in PIXELS:
        p = i * W + j
        assert receptive_field(block, H, W, i, j, C) == paper_keys(p, kind, causal) | {p}, (kind, i, j)


@pytest.mark.parametrize("causal", [False, True])
def test_full_cycle_equals_dense_masked_steps(causal):
    block = build("jukebox", C, causal=causal)
    assert block.attn_order == ("row", "column", "prev_row")
    x = feature_map(2, C, H, W)
    t = to_tokens(x).double()
    for kind, step in zip(block.attn_order, block.steps, strict=True):
        want = mask_from_sets(H * W, H * W, lambda p, kind=kind: paper_keys(p, kind, causal))
        assert torch.equal(map_mask(block.pattern(kind, H, W), H, W), want)
        step = step.double()
        t = t + pattern_attention_reference(step, t, want)
        step.float()
    with torch.no_grad():
        torch.testing.assert_close(block(x).double(), to_map(t, H, W), atol=1e-5, rtol=1e-5)


def test_first_row_gets_nothing_from_the_previous_row_step():
    block = build("jukebox", C, attn_order=("prev_row",), causal=True).eval()
    x = feature_map(1, C, H, W)
    with torch.no_grad():
        out = block(x)
    # No keys: the attention is 0 and only the output projection's bias remains.
    bias = block.steps[0].proj.bias[None, :, None]
    torch.testing.assert_close(out[..., 0, :], x[..., 0, :] + bias, atol=1e-6, rtol=0)
    assert not torch.allclose(out[..., 1:, :], x[..., 1:, :])


def test_other_cycle_orders_stay_causal():
    block = build("jukebox", C, attn_order=("prev_row", "column", "row", "column"), causal=True).eval()
    support = raster_jacobian_support(block, C, 5, 7)
    assert not (support & torch.triu(torch.ones_like(support), diagonal=1)).any()
    assert (support & torch.tril(torch.ones_like(support), diagonal=-1)).any()


def test_saved_activations_grow_at_most_as_n_sqrt_n():
    block = build("jukebox", C).train()
    mem = [saved_activation_bytes(block, feature_map(1, C, s, s, requires_grad=True)) for s in (16, 32)]
    assert math.log(mem[1] / mem[0]) / math.log(4) <= 1.6


def test_invalid_hyperparameters_raise():
    for kwargs in ({"attn_order": ()}, {"attn_order": ("row", "diagonal")}, {"heads": 3}):
        with pytest.raises(ValueError, match="^jukebox: "):
            build("jukebox", C, **kwargs)
