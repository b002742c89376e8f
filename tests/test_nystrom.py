"""Nyströmformer: pseudo-inverse, per-sample initialisation, explicit formula, landmarks = N, budget."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map

import visattn
from visattn.attn.nystrom import cell_means, newton_schulz_pinv
from visattn.layers import multihead_sdpa, to_tokens

C, HEADS = 8, 2


def softmax_matrix(m: int, seed: int, temperature: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, m, generator=g, dtype=torch.float64) * temperature).softmax(-1)


def plain_iteration(a: torch.Tensor, iterations: int, z: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    for _ in range(iterations):
        z = 0.25 * z @ (13 * eye - a @ z @ (15 * eye - a @ z @ (7 * eye - a @ z)))
    return z


def test_pinv_converges_to_the_moore_penrose_inverse():
    a = softmax_matrix(8, 0)
    torch.testing.assert_close(newton_schulz_pinv(a, 20), torch.linalg.pinv(a), atol=1e-8, rtol=1e-8)
    z = newton_schulz_pinv(a, 6)
    assert (a @ z @ a - a).abs().max() < 1e-2  # 6 iterations: close, not converged


def test_pinv_initialisation_is_per_sample():
    a, b = softmax_matrix(6, 1), softmax_matrix(6, 2, temperature=4.0) * 30
    batch = torch.stack([a, b])
    torch.testing.assert_close(
        newton_schulz_pinv(batch, 6)[0], newton_schulz_pinv(a[None], 6)[0], atol=0, rtol=0
    )
    # The reference's batch-wide scaling would give `a` another (less converged) result: the check can fail.
    norms = batch.abs().sum(-2).amax(-1).amax() * batch.abs().sum(-1).amax(-1).amax()
    batch_wide = plain_iteration(a, 6, a.T / norms)
    assert (batch_wide - newton_schulz_pinv(a[None], 6)[0]).abs().max() > 1e-3


def adaptive_mean(t: torch.Tensor, h: int, w: int, grid) -> torch.Tensor:
    """(N, C) tokens -> (m, C) cell means: bins [floor(i·n/g), ceil((i+1)·n/g)) along an axis with n >= g
    pixels, the single pixel floor(i·n/g) along a shorter axis."""

    def cells(n, g):
        if n < g:
            return [range(i * n // g, i * n // g + 1) for i in range(g)]
        return [range(i * n // g, -(-(i + 1) * n // g)) for i in range(g)]

    out = []
    for rows in cells(h, grid[0]):
        for cols in cells(w, grid[1]):
            out.append(t[[r * w + c for r in rows for c in cols]].mean(0))
    return torch.stack(out)


@pytest.mark.parametrize(
    "hw,grid", [((16, 20), (8, 8)), ((13, 9), (8, 8)), ((5, 7), (2, 3)), ((3, 3), (3, 3))]
)
def test_cell_means_is_adaptive_average_pooling(hw, grid):
    x = feature_map(2, 3, *hw).double()
    torch.testing.assert_close(cell_means(x, grid), torch.nn.functional.adaptive_avg_pool2d(x, grid))


def reference_output(block, x: torch.Tensor, grid) -> torch.Tensor:
    b, c, h, w = x.shape
    n, d = h * w, c // HEADS
    p = {k: v.double() for k, v in block.state_dict().items()}
    feat = block.pos(x) if block.pos is not None else x
    y = x.double().clone()
    for bi in range(b):
        t = feat[bi].double().reshape(c, n).T
        q = t @ p["q.weight"].T + p["q.bias"]
        kv = t @ p["kv.weight"].T + p["kv.bias"]
        k, v = kv[:, :c], kv[:, c:]
        out = torch.zeros(n, c, dtype=torch.float64)
        for hd in range(HEADS):
            sl = slice(hd * d, (hd + 1) * d)
            qh, kh, vh = q[:, sl], k[:, sl], v[:, sl]
            ql, kl = adaptive_mean(qh, h, w, grid), adaptive_mean(kh, h, w, grid)
            f_ = torch.softmax(qh @ kl.T / math.sqrt(d), -1)
            a_ = torch.softmax(ql @ kl.T / math.sqrt(d), -1)
            b_ = torch.softmax(ql @ kh.T / math.sqrt(d), -1)
            z0 = a_.T / (a_.abs().sum(0).max() * a_.abs().sum(1).max())
            out[:, sl] = f_ @ plain_iteration(a_, block.pinv_iterations, z0) @ b_ @ vh
            if "conv_weight" in p:
                kern = p["conv_weight"][hd, 0]
                r = kern.shape[0] // 2
                for i in range(h):
                    for j in range(w):
                        for di in range(-r, r + 1):
                            for dj in range(-r, r + 1):
                                if 0 <= i + di < h and 0 <= j + dj < w:
                                    out[i * w + j, sl] += kern[di + r, dj + r] * vh[(i + di) * w + j + dj]
        y[bi] += (out @ p["proj.weight"].T + p["proj.bias"]).T.reshape(c, h, w)
    return y


@pytest.mark.parametrize(
    "hw,landmarks,kwargs",
    [
        ((4, 6), (2, 3), {}),  # exact 2x2 cells
        ((5, 7), (2, 3), {"conv_kernel": 3}),  # overlapping adaptive bins
        ((3, 2), 16, {"pos_enc": False}),  # map smaller than the grid: repeated pixels
        ((2, 9), (4, 4), {}),  # shorter along H only
    ],
)
def test_matches_formula(hw, landmarks, kwargs):
    block = build("nystrom", C, landmarks=landmarks, heads=HEADS, **kwargs).double().eval()
    x = feature_map(2, C, *hw).double()
    grid = landmarks if isinstance(landmarks, tuple) else (4, 4)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference_output(block, x, grid), atol=1e-9, rtol=1e-9)


def attention_outputs(block, x):
    """(Nyström branch, exact softmax attention) before the output projection, as (B, N, C) tokens."""
    with torch.no_grad():
        block.proj.weight.copy_(torch.eye(block.channels))
        block.proj.bias.zero_()
        t = to_tokens(x)
        k, v = block.kv(t).chunk(2, -1)
        return to_tokens(block(x) - x), multihead_sdpa(block.q(t), k, v, block.heads)


@pytest.mark.parametrize("iterations,tol", [(6, 5e-2), (20, 1e-4)])
@pytest.mark.parametrize("landmarks", [(6, 6), (8, 8)], ids=["m=N", "m>N"])
def test_landmarks_equal_to_pixels_is_softmax_attention(iterations, tol, landmarks):
    h, w = 6, 6
    kw = {"landmarks": landmarks, "conv_kernel": 0, "pos_enc": False, "pinv_iterations": iterations}
    block = build("nystrom", 32, **kw).eval()
    approx, exact = attention_outputs(block, feature_map(2, 32, h, w))
    assert ((approx - exact).norm() / exact.norm()).item() < tol


def test_error_shrinks_with_the_landmark_budget():
    x = feature_map(1, 32, 16, 16)
    errors = {}
    for side in (2, 4, 8, 16):
        kw = {"landmarks": side * side, "conv_kernel": 0, "pos_enc": False}
        approx, exact = attention_outputs(build("nystrom", 32, **kw).eval(), x)
        errors[side * side] = ((approx - exact).norm() / exact.norm()).item()
    print("nystrom relative error vs softmax attention by landmarks:", errors)
    assert errors[4] > errors[16] > errors[64] > errors[256]
    assert errors[256] < 0.05


@pytest.mark.parametrize(
    "kwargs",
    [{"landmarks": 10}, {"landmarks": (0, 4)}, {"pinv_iterations": 0}, {"conv_kernel": 4}, {"heads": 3}],
)
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^nystrom: "):
        visattn.create_attn("nystrom", 32, **kwargs)
