"""Input-independent attention: the paper's patterns, the explicit formula, resampling, input independence."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map

import visattn
from visattn.attn.inputless import paper_patterns

C, HEADS, REF = 8, 2, (3, 4)


def linear_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) 1-D resampling matrix: linear interpolation with align_corners=False when upsampling, a
    triangle filter widened by the factor when downsampling (PyTorch's antialiased bilinear)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        center = (o + 0.5) * scale
        for i in range(n_in):
            m[o, i] = max(0.0, 1.0 - abs(i + 0.5 - center) / support)
    return m / m.sum(1, keepdim=True)


def test_paper_patterns_by_hand():
    n = 6
    p = paper_patterns(n)
    assert p.shape == (7, n, n)
    torch.testing.assert_close(p.sum(-1), torch.ones(7, n, dtype=torch.float64))
    eye = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(p[0], eye)
    assert p[1][2, 3] == 1 and p[1][5, 5] == 1  # next; the last position has none and attends to itself
    assert p[2][2, 1] == 1 and p[2][0, 0] == 1  # previous
    torch.testing.assert_close(
        p[3][4, :3], torch.tensor([1.0, 8.0, 27.0], dtype=torch.float64) / 36
    )  # j <= i-2
    assert p[3][4, 3:].sum() == 0 and p[3][1, 1] == 1
    torch.testing.assert_close(p[4][1, 3:], torch.tensor([64.0, 125.0, 216.0], dtype=torch.float64) / 405)
    cube = torch.arange(1, n + 1, dtype=torch.float64) ** 3
    torch.testing.assert_close(p[5][0], cube / cube.sum())  # every query looks at the last positions
    torch.testing.assert_close(p[6][3], cube.flip(0) / cube.sum())  # ... or at the first ones


def test_initial_attention_is_the_patterns():
    block = visattn.create_attn("inputless", 16, ref_size=(4, 4))
    assert block.heads == 8  # 12 heads in the paper; the largest divisor of 16 not above 12
    weights = block.logits.detach().double().softmax(-1)
    torch.testing.assert_close(weights[:7], paper_patterns(16), atol=16 * math.exp(-10), rtol=0)
    assert not torch.allclose(weights[7], weights[0])  # the eighth head starts random


def reference_output(block, x: torch.Tensor, causal: bool) -> torch.Tensor:
    b, c, h, w = x.shape
    n, d = h * w, c // HEADS
    p = {k: v.double() for k, v in block.state_dict().items()}
    i_mat = torch.kron(linear_matrix(h, REF[0]), linear_matrix(w, REF[1]))
    y = x.double().clone()
    for bi in range(b):
        values = x[bi].double().reshape(c, n).T @ p["value.weight"].T + p["value.bias"]
        for q in range(n):
            mixed = torch.zeros(c, dtype=torch.float64)
            for hd in range(HEADS):
                logits = i_mat @ p["logits"][hd] @ i_mat.T
                row = logits[q, : q + 1] if causal else logits[q]
                weights = torch.softmax(row, 0)
                for j in range(len(weights)):
                    mixed[hd * d : (hd + 1) * d] += weights[j] * values[j, hd * d : (hd + 1) * d]
            y[bi, :, q // w, q % w] += p["proj.weight"] @ mixed + p["proj.bias"]
    return y


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hw", [REF, (5, 2), (2, 7)], ids=["ref", "up", "mixed"])
def test_matches_formula(causal, hw):
    block = build("inputless", C, heads=HEADS, ref_size=REF, causal=causal).double().eval()
    x = feature_map(2, C, *hw).double()
    with torch.no_grad():
        got = block(x)
    torch.testing.assert_close(got, reference_output(block, x, causal), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_output_is_affine_in_the_input(causal):
    # Weights that ignore the input make x -> block(x) affine; a content-dependent softmax would not be.
    block = build("inputless", 16, causal=causal, ref_size=(4, 4)).double().eval()
    x1, x2 = feature_map(1, 16, 6, 5).double(), feature_map(1, 16, 6, 5, seed=7).double() * 3
    zero = torch.zeros_like(x1)
    with torch.no_grad():
        lhs = block(x1 + x2) - block(zero)
        rhs = block(x1) - block(zero) + block(x2) - block(zero)
    torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=1e-10)
    assert (lhs - (x1 + x2)).abs().max() > 1e-3  # the attention branch is active (perturbed weights)


def test_upsampled_self_pattern_stays_local():
    # The "self" head resampled 4x: every query's heaviest key is within one reference cell of itself.
    block = visattn.create_attn("inputless", 16, ref_size=(4, 4))
    weights = block.attention_logits(16, 16)[0].softmax(-1)
    top = weights.argmax(-1)
    qy, qx = torch.arange(256) // 16, torch.arange(256) % 16
    assert ((top // 16 - qy).abs() <= 4).all() and ((top % 16 - qx).abs() <= 4).all()


def test_fixed_maps_are_buffers():
    block = visattn.create_attn("inputless", 32, trainable=False)
    assert "logits" in dict(block.named_buffers()) and "logits" not in dict(block.named_parameters())


@pytest.mark.parametrize("kwargs", [{"heads": 5}, {"heads": 0}, {"ref_size": 0}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^inputless: "):
        visattn.create_attn("inputless", 32, **kwargs)
