"""dnl: the disentangled non-local block against a naive float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map

import visattn


def naive_dnl(block, x):
    """Loops over pixels: whitened pairwise softmax / temperature plus the unary saliency term."""
    b, c, h, w = x.shape
    n = h * w
    with torch.no_grad():
        q = block.theta(x).flatten(2)  # (B, d, N)
        k = block.phi(x).flatten(2)
        v = block.g(x).flatten(2)
        m = block.conv_mask(x).flatten(2)[:, 0]  # (B, N)
        d = q.shape[1]
        y = torch.zeros_like(v)
        for s in range(b):
            qs = q[s] - q[s].mean(dim=1, keepdim=True)
            ks = k[s] - k[s].mean(dim=1, keepdim=True)
            unary_w = torch.exp(m[s] - m[s].max())
            unary_w = unary_w / unary_w.sum()
            unary = sum(unary_w[j] * v[s][:, j] for j in range(n))
            for i in range(n):
                logits = (
                    torch.stack([qs[:, i] @ ks[:, j] for j in range(n)]) / math.sqrt(d) / block.temperature
                )
                p = torch.softmax(logits, dim=0)
                y[s][:, i] = sum(p[j] * v[s][:, j] for j in range(n)) + unary
        return x + block.conv_out(y.reshape(b, d, h, w))


def test_matches_naive_reference():
    block = build("dnl", 16).double().eval()
    x = feature_map(2, 16, 3, 5).double()
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out, naive_dnl(block, x), atol=1e-10, rtol=1e-8)


def test_whitening_removes_a_key_offset_and_unary_sees_it():
    """Adding a constant vector to every key leaves the whitened pairwise term unchanged."""
    block = build("dnl", 8).double().eval()
    x = feature_map(1, 8, 4, 4).double()
    with torch.no_grad():
        block.conv_mask.weight.zero_()  # uniform unary weights: the unary term is mean(g)
        ref = block(x)
        block.phi.conv.bias.add_(3.0)  # shifts every key by the same vector
        torch.testing.assert_close(block(x), ref, atol=1e-10, rtol=1e-10)


def test_identity_at_init_and_mmseg_names():
    block = visattn.create_attn("dnl", 32)
    x = feature_map(2, 32, 5, 6)
    assert torch.equal(block(x), x)
    keys = set(block.state_dict())
    for name in (
        "g.conv.weight",
        "g.conv.bias",
        "theta.conv.weight",
        "phi.conv.bias",
        "conv_out.conv.weight",
        "conv_out.bn.weight",
        "conv_mask.weight",
        "conv_mask.bias",
    ):
        assert name in keys
    assert "conv_out.conv.bias" not in keys  # mmcv's ConvModule: no bias before a norm


@pytest.mark.parametrize("kwargs", [{"reduction": 0}, {"temperature": 0.0}, {"reduction": 1.5}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^dnl: "):
        visattn.create_attn("dnl", 16, **kwargs)
