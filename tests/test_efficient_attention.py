"""Efficient Attention (Shen et al.): the block equals its explicit formula, with one residual."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map

import visattn


def _projections(block, x):
    """Q, K (B, d_k, N), V (B, d_v, N) from the block's own 1x1 convs, in float64."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)

    def conv(m):
        return torch.einsum("oc,bcn->bon", m.weight.reshape(-1, c), flat) + m.bias[:, None]

    return conv(block.queries), conv(block.keys), conv(block.values)


def _reproject(block, x, e):
    b, c, h, w = x.shape
    out = (
        torch.einsum("cv,bvn->bcn", block.reprojection.weight.reshape(c, -1), e)
        + block.reprojection.bias[:, None]
    )
    return x + out.reshape(b, c, h, w)


def _explicit_softmax_reference(block, x):
    """E[c, n] = Σ_j ρ_q(Q)[j, n] Σ_m ρ_k(K)[j, m] V[c, m], per head, with explicit loops."""
    q, k, v = _projections(block, x)
    b, n = x.shape[0], q.shape[-1]
    g = block.heads
    dk, dv = block.key_channels // g, block.value_channels // g
    e = torch.zeros(b, block.value_channels, n, dtype=x.dtype)
    for bi in range(b):
        for head in range(g):
            qs = q[bi, head * dk : (head + 1) * dk]
            ks = k[bi, head * dk : (head + 1) * dk]
            vs = v[bi, head * dv : (head + 1) * dv]
            for pos in range(n):
                rho_q = [
                    math.exp(qs[j, pos]) / sum(math.exp(qs[i, pos]) for i in range(dk)) for j in range(dk)
                ]
                for c in range(dv):
                    acc = 0.0
                    for j in range(dk):
                        z = sum(math.exp(ks[j, m]) for m in range(n))
                        acc += rho_q[j] * sum(math.exp(ks[j, m]) / z * vs[c, m] for m in range(n))
                    e[bi, head * dv + c, pos] = acc
    return _reproject(block, x, e)


@pytest.mark.parametrize("heads", [1, 2])
def test_equals_explicit_softmax_formula(heads):
    block = build("efficient_attention", 8, key_channels=4, value_channels=6, heads=heads).double().eval()
    x = feature_map(2, 8, 3, 4).double()
    with torch.no_grad():
        out = block(x)
        ref = _explicit_softmax_reference(block, x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_scaling_normalisation_equals_dense_dot_product_attention():
    """The paper's equivalence: with ρ = Y/√n, Q(KᵀV)/n == (QKᵀ/n)V, the dense N x N form."""
    block = build(
        "efficient_attention", 8, key_channels=4, value_channels=4, heads=2, normalization="scaling"
    )
    block = block.double().eval()
    x = feature_map(2, 8, 5, 3).double()
    q, k, v = _projections(block, x)
    n = q.shape[-1]
    e = torch.zeros_like(v)
    for head in range(2):
        sl = slice(head * 2, head * 2 + 2)
        attn = torch.einsum("bjn,bjm->bnm", q[:, sl], k[:, sl]) / n  # explicit N x N map
        e[:, sl] = torch.einsum("bnm,bcm->bcn", attn, v[:, sl])
    with torch.no_grad():
        torch.testing.assert_close(block(x), _reproject(block, x, e), atol=1e-10, rtol=1e-10)


def test_float32_matches_float64_reference():
    block = build("efficient_attention", 16, heads=2).eval()
    x = feature_map(1, 16, 4, 4)
    with torch.no_grad():
        ref = _explicit_softmax_reference(block.double(), x.double())
        out = block.float()(x)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_single_residual_and_normalisations():
    """Output minus input is the reprojected attention alone (no second `+ x`), and the two
    softmaxes normalise over key channels per pixel and over pixels per key channel."""
    block = build("efficient_attention", 8, key_channels=4, value_channels=4, heads=1).eval()
    x = feature_map(1, 8, 4, 4)
    with torch.no_grad():
        block.reprojection.weight.zero_()
        block.reprojection.bias.fill_(0.5)
        torch.testing.assert_close(block(x) - x, torch.full_like(x, 0.5))
        q, k, _ = _projections(block, x)
    assert torch.allclose(q.softmax(1).sum(1), torch.ones(1, 16))
    assert torch.allclose(k.softmax(2).sum(2), torch.ones(1, 4))


def test_defaults_and_validation():
    block = visattn.create_attn("efficient_attention", 64)
    assert (block.key_channels, block.value_channels, block.heads) == (32, 32, 1)
    for kwargs in ({"heads": 3}, {"key_channels": 0}, {"normalization": "relu"}, {"heads": 0}):
        with pytest.raises(ValueError, match="^efficient_attention: "):
            visattn.create_attn("efficient_attention", 64, **kwargs)
