"""Kronecker attention (KAO_QKV and KAO_KV) against slow explicit references."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map

import visattn
from visattn.attn.kronecker import KroneckerAttention
from visattn.bench import count_flops

C, HEADS = 8, 2


def _block(variant: str) -> torch.nn.Module:
    return build("kronecker", C, variant=variant, heads=HEADS).double().eval()


def _explicit_tokens(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (H + W, C): row means then column means, by loops."""
    c, h, w = x.shape
    out = torch.zeros(h + w, c, dtype=x.dtype)
    for i in range(h):
        for j in range(w):
            out[i] += x[:, i, j] / w
            out[h + j] += x[:, i, j] / h
    return out


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-query, per-head softmax(q·k / sqrt(d)) v by loops; q (Nq, C), k, v (Nk, C)."""
    d = q.shape[1] // heads
    out = torch.zeros(q.shape[0], q.shape[1], dtype=q.dtype)
    for hd in range(heads):
        sl = slice(hd * d, (hd + 1) * d)
        for i in range(q.shape[0]):
            logits = torch.stack([q[i, sl] @ k[j, sl] / math.sqrt(d) for j in range(k.shape[0])])
            weights = torch.exp(logits - logits.max())
            weights = weights / weights.sum()
            out[i, sl] = sum(weights[j] * v[j, sl] for j in range(k.shape[0]))
    return out


def test_average_tokens_match_explicit_means():
    x = feature_map(2, C, 3, 5).double()
    tokens = KroneckerAttention.average_tokens(x)
    for b in range(2):
        torch.testing.assert_close(tokens[b], _explicit_tokens(x[b]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("size", [(3, 5), (4, 1)])
def test_kao_qkv_matches_explicit(size):
    h, w = size
    block = _block("qkv")
    x = feature_map(2, C, h, w, seed=3).double()
    with torch.no_grad():
        out = block(x)
    wq, bq = block.qkv.weight, block.qkv.bias
    wp, bp = block.proj.weight, block.proj.bias
    for b in range(2):
        tokens = _explicit_tokens(x[b])
        q, k, v = (tokens @ wq.T + bq).split(C, dim=1)
        o = _explicit_attention(q, k, v, HEADS)
        ref = torch.empty(C, h, w, dtype=x.dtype)
        for i in range(h):
            for j in range(w):
                # Output at (i, j) is the projection of the outer (Kronecker) sum of row i and column j.
                ref[:, i, j] = x[b, :, i, j] + wp @ (o[i] + o[h + j]) + bp
        torch.testing.assert_close(out[b], ref, atol=1e-10, rtol=1e-10)


def test_kao_kv_matches_explicit():
    h, w = 3, 4
    block = _block("kv")
    x = feature_map(2, C, h, w, seed=4).double()
    with torch.no_grad():
        out = block(x)
    wq, bq = block.qkv.weight, block.qkv.bias
    wp, bp = block.proj.weight, block.proj.bias
    for b in range(2):
        tokens = _explicit_tokens(x[b])
        _, k, v = (tokens @ wq.T + bq).split(C, dim=1)
        pixels = x[b].reshape(C, h * w).T  # raster order
        q = pixels @ wq[:C].T + bq[:C]
        o = _explicit_attention(q, k, v, HEADS)
        ref = x[b] + (o @ wp.T + bp).T.reshape(C, h, w)
        torch.testing.assert_close(out[b], ref, atol=1e-10, rtol=1e-10)


def test_kao_qkv_residual_is_an_outer_sum():
    """The KAO_QKV update d = y - x satisfies d[i, j] = r[i] + c[j]: zero mixed second differences."""
    block = _block("qkv")
    x = feature_map(1, C, 6, 7, seed=5).double()
    with torch.no_grad():
        d = block(x) - x
    mixed = d - d[:, :, :1, :] - d[:, :, :, :1] + d[:, :, :1, :1]
    assert d.abs().max() > 1e-3
    assert mixed.abs().max() < 1e-12
    # KAO_KV has no such structure: every pixel queries on its own.
    with torch.no_grad():
        d_kv = _block("kv")(x) - x
    mixed_kv = d_kv - d_kv[:, :, :1, :] - d_kv[:, :, :, :1] + d_kv[:, :, :1, :1]
    assert mixed_kv.abs().max() > 1e-4


def test_kao_qkv_cost_depends_on_h_plus_w_only():
    """O((H+W)²·D): with the residual add and the means uncounted, the FLOPs of 8x24, 16x16 and
    4x28 maps (all H + W = 32) are equal, and KAO_KV costs grow with H·W."""
    block = build("kronecker", 32).eval()
    with torch.no_grad():
        counts = {hw: count_flops(block, feature_map(1, 32, *hw)) for hw in [(8, 24), (16, 16), (4, 28)]}
    assert len(set(counts.values())) == 1, counts
    kv = build("kronecker", 32, variant="kv").eval()
    with torch.no_grad():
        assert count_flops(kv, feature_map(1, 32, 16, 16)) > count_flops(kv, feature_map(1, 32, 8, 24))


def test_variants_share_parameters():
    a, b = build("kronecker", C, variant="qkv"), build("kronecker", C, variant="kv", seed=1)
    b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("kwargs", [{"variant": "kq"}, {"heads": 3}, {"heads": 0}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^kronecker: "):
        visattn.create_attn("kronecker", C, **kwargs)
