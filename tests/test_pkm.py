"""Product-key memory: the product-key top-k equals brute force over all n_keys² keys."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import build, feature_map

import visattn


def _brute_force(block, x):
    """Every one of the n_keys² product keys scored explicitly, top-k, softmax, weighted value rows."""
    b, c, h, w = x.shape
    block = copy.deepcopy(block).double()
    tokens = x.flatten(2).transpose(1, 2).reshape(-1, c).double()
    q = block.query_norm(block.query(tokens).view(-1, block.heads, block.k_dim))
    half = block.k_dim // 2
    keys, values = block.keys, block.values.weight
    nk = block.n_keys
    out = torch.zeros(tokens.shape[0], c, dtype=torch.float64)
    for hd in range(block.heads):
        # Product key (i, j) = [K1_i ; K2_j]: its score is q1·K1_i + q2·K2_j.
        full = torch.cat(
            [keys[hd, 0].repeat_interleave(nk, 0), keys[hd, 1].repeat(nk, 1)], dim=1
        )  # (nk², k_dim), row i*nk + j
        assert full.shape == (nk * nk, 2 * half)
        scores = q[:, hd] @ full.T
        top, idx = scores.topk(block.topk, dim=-1)
        out += (torch.softmax(top, -1).unsqueeze(-1) * values[idx]).sum(1)
    out = block.proj(out)
    return x.double() + out.view(b, h * w, c).transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("n_keys,topk", [(6, 4), (8, 8), (5, 7)])
def test_equals_brute_force_top_k_over_all_product_keys(n_keys, topk):
    block = build("pkm", 16, n_keys=n_keys, topk=topk, heads=3, k_dim=8, seed=1).eval()
    x = feature_map(2, 16, 3, 5, seed=4)
    with torch.no_grad():
        ref = _brute_force(block, x)
        out = block(x).double()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_lookup_indices_match_brute_force():
    block = build("pkm", 16, n_keys=10, topk=6, k_dim=12, seed=2).eval()
    tokens = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores, slots = block.lookup(tokens)
        q = block.query_norm(block.query(tokens).view(50, block.heads, 12)).view(50, block.heads, 2, 6)
        s1 = torch.einsum("mhd,hkd->mhk", q[:, :, 0], block.keys[:, 0])
        s2 = torch.einsum("mhd,hkd->mhk", q[:, :, 1], block.keys[:, 1])
        full = (s1[..., :, None] + s2[..., None, :]).flatten(2)
        ref_scores, ref_slots = full.topk(6, dim=-1)
    del full
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(slots.sort(-1).values, ref_slots.sort(-1).values)


def test_token_wise_and_identity_at_init():
    torch.manual_seed(0)
    block = visattn.create_attn("pkm", 16).eval()
    x = feature_map(1, 16, 4, 4)
    with torch.no_grad():
        assert torch.equal(block(x), x)
    block = build("pkm", 16).eval()
    with torch.no_grad():
        ref = block(x)
        y = x.clone()
        y[..., 2, 3] += 5.0
        diff = (block(y) - ref).abs().sum(1)[0]
    assert diff[2, 3] > 0 and (diff.flatten().nonzero().flatten() == 2 * 4 + 3).all()


@pytest.mark.parametrize("kwargs", [{"heads": 0}, {"k_dim": 7}, {"topk": 0}, {"n_keys": -1}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^pkm: "):
        visattn.create_attn("pkm", 16, **kwargs)
