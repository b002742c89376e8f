"""Synthesizer: every mode against its formula, written with loops, at the reference size and resampled."""

from __future__ import annotations

import pytest
import torch
from helpers import build, feature_map, raster_jacobian_support

import visattn

MODES = ["dense", "random", "factorized_dense", "factorized_random"]
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


def grid_matrix(hw, ref=REF) -> torch.Tensor:
    """(H·W, h_ref·w_ref) bilinear interpolation matrix in raster order."""
    return torch.kron(linear_matrix(hw[0], ref[0]), linear_matrix(hw[1], ref[1]))


def reference_logits(block, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, N) synthetic logits straight from the paper's formulas, then I·S·Iᵀ resampling."""
    b, c, h, w = x.shape
    n, d = h * w, c // HEADS
    p = {k: v.double() for k, v in block.state_dict().items()}
    i_mat = grid_matrix((h, w))
    out = torch.zeros(b, HEADS, n, n, dtype=torch.float64)
    for bi in range(b):
        for hd in range(HEADS):
            if block.mode == "random":
                out[bi, hd] = i_mat @ p["r"][hd] @ i_mat.T
            elif block.mode == "factorized_random":
                out[bi, hd] = i_mat @ p["r1"][hd] @ p["r2"][hd].T @ i_mat.T
            else:
                for q in range(n):
                    tok = x[bi, :, q // w, q % w].double()
                    hidden = torch.relu(p["hidden.weight"] @ tok + p["hidden.bias"])[hd * d : (hd + 1) * d]
                    s = hidden @ p["w2"][hd] + p["b2"][hd]
                    if block.mode == "dense":
                        out[bi, hd, q] = i_mat @ s
                    else:  # tile A along rows and B along columns: S[r, c] = A_r B_c
                        a = linear_matrix(h, REF[0]) @ s[: REF[0]]
                        bb = linear_matrix(w, REF[1]) @ s[REF[0] :]
                        out[bi, hd, q] = torch.outer(a, bb).flatten()
    return out


def reference_output(block, x: torch.Tensor, causal: bool) -> torch.Tensor:
    b, c, h, w = x.shape
    n, d = h * w, c // HEADS
    p = {k: v.double() for k, v in block.state_dict().items()}
    logits = reference_logits(block, x)
    y = x.double().clone()
    for bi in range(b):
        tokens = x[bi].double().reshape(c, n).T
        values = tokens @ p["value.weight"].T + p["value.bias"]
        for q in range(n):
            mixed = torch.zeros(c, dtype=torch.float64)
            for hd in range(HEADS):
                keys = range(q + 1) if causal else range(n)
                row = torch.stack([logits[bi, hd, q, j] for j in keys])
                weights = torch.softmax(row, 0)
                for wj, j in zip(weights, keys, strict=True):
                    mixed[hd * d : (hd + 1) * d] += wj * values[j, hd * d : (hd + 1) * d]
            y[bi, :, q // w, q % w] += p["proj.weight"] @ mixed + p["proj.bias"]
    return y


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hw", [REF, (5, 2)], ids=["ref", "resampled"])
def test_matches_formula(mode, causal, hw):
    block = build("synthesizer", C, mode=mode, heads=HEADS, ref_size=REF, causal=causal).double().eval()
    x = feature_map(2, C, *hw).double()
    with torch.no_grad():
        got = block(x)
    torch.testing.assert_close(got, reference_output(block, x, causal), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_logits_resample_like_the_interpolation_matrix(mode):
    block = build("synthesizer", C, mode=mode, heads=HEADS, ref_size=REF).double().eval()
    x = feature_map(1, C, 7, 6).double()
    with torch.no_grad():
        got = block.logits(visattn.layers.to_tokens(x), 7, 6)
    torch.testing.assert_close(got.expand(1, -1, -1, -1), reference_logits(block, x), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_causal_support_is_the_past_in_every_mode(mode):
    block = build("synthesizer", C, mode=mode, heads=HEADS, ref_size=REF, causal=True).eval()
    support = raster_jacobian_support(block, C, 4, 5)
    assert not torch.triu(support, diagonal=1).any()
    assert torch.tril(support, diagonal=-1).any()


def test_random_modes_are_input_independent_and_dense_is_not():
    x, y = feature_map(1, C, 5, 5), feature_map(1, C, 5, 5, seed=3)
    for mode in MODES:
        block = build("synthesizer", C, mode=mode, heads=HEADS).eval()
        with torch.no_grad():
            same = torch.allclose(
                block.logits(visattn.layers.to_tokens(x), 5, 5),
                block.logits(visattn.layers.to_tokens(y), 5, 5),
            )
        assert same == (mode in ("random", "factorized_random")), mode


def test_fixed_random_is_a_buffer_and_factorized_rank():
    fixed = visattn.create_attn("synthesizer", 32, mode="random", trainable_random=False)
    assert "r" in dict(fixed.named_buffers()) and "r" not in dict(fixed.named_parameters())
    fact = visattn.create_attn("synthesizer", 32, mode="factorized_random", rank=8, ref_size=(4, 6))
    assert fact.r1.shape == (fact.heads, 24, 8)


@pytest.mark.parametrize(
    "kwargs", [{"mode": "mixture"}, {"heads": 3}, {"rank": 0}, {"ref_size": 0}, {"ref_size": (4, -1)}]
)
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^synthesizer: "):
        visattn.create_attn("synthesizer", 32, **kwargs)
