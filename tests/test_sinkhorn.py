"""Sparse Sinkhorn attention: balancing, the one-window limit, sorted attention against a per-window loop."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map, perturb_, raster_jacobian_support

from visattn.attn.sinkhorn import sinkhorn


def _windows(t, p, height, width):
    """(B, C, H, W) padded map -> (B, nW, P², C)."""
    b, c = t.shape[:2]
    return t.reshape(b, c, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p, c)


def test_sinkhorn_matches_naive_alternating_normalisation():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(2, 6, 6, generator=g, dtype=torch.float64) * 3
    p = r.exp()
    for _ in range(4):
        p = p / p.sum(-1, keepdim=True)
        p = p / p.sum(-2, keepdim=True)
    torch.testing.assert_close(sinkhorn(r, 4).double(), p, atol=1e-6, rtol=1e-5)


def test_causal_sinkhorn_normalises_columns_over_past_rows_only():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(5, 5, generator=g, dtype=torch.float64)
    allowed = torch.ones(5, 5, dtype=torch.bool).tril(-1)
    p = r.exp() * allowed
    for _ in range(3):
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
        p = p / p.cumsum(-2).clamp_min(1e-300)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    torch.testing.assert_close(sinkhorn(r, 3, allowed, causal=True).double(), p, atol=1e-6, rtol=1e-5)
    # Changing a later row never changes an earlier one.
    r2 = r.clone()
    r2[3:] += 5.0
    torch.testing.assert_close(
        sinkhorn(r2, 3, allowed, causal=True)[:3], sinkhorn(r, 3, allowed, causal=True)[:3]
    )


def test_sort_matrix_is_doubly_stochastic():
    # With the paper's 7 iterations Sinkhorn is balanced for moderately peaked scores (here the largest
    # entry is ~13x the uniform 1/64); near-permutation scores need more iterations (next test).
    block = perturb_(build("sinkhorn", 32, window_size=4), seed=3, scale=0.4).eval()
    with torch.no_grad():
        s = block.sort_matrix(feature_map(2, 32, 30, 32))  # 64 windows, the last row padded
    assert s.shape == (2, 1, 64, 64)
    assert s.max() > 10 / 64, "nearly uniform sort matrix: the check would be vacuous"
    torch.testing.assert_close(s.sum(-1), torch.ones_like(s.sum(-1)), atol=1e-3, rtol=0)
    torch.testing.assert_close(s.sum(-2), torch.ones_like(s.sum(-2)), atol=1e-3, rtol=0)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_more_iterations_balance_sharper_scores(mode):
    # Sharp scores (eval) or Gumbel noise (training) give near-permutations: rows converge slowly.
    block = perturb_(build("sinkhorn", 32, window_size=4), seed=3, scale=0.6).train(mode == "train")
    x = feature_map(2, 32, 30, 32)
    errors = []
    with torch.no_grad():
        for iters in (7, 20, 100):
            block.sinkhorn_iter = iters
            torch.manual_seed(0)
            s = block.sort_matrix(x)
            torch.testing.assert_close(s.sum(-2), torch.ones_like(s.sum(-2)), atol=1e-5, rtol=0)
            errors.append((s.sum(-1) - 1).abs().max().item())
    assert s.max() > 0.5
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors


def test_gumbel_noise_only_in_training():
    block = build("sinkhorn", 32, window_size=4)
    x = feature_map(1, 32, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block.eval().sort_matrix(x), block.sort_matrix(x), atol=0, rtol=0)
        block.train()
        assert not torch.allclose(block.sort_matrix(x), block.sort_matrix(x))


@pytest.mark.parametrize("causal", [False, True])
def test_one_window_is_full_attention(causal):
    block = build("sinkhorn", 16, heads=2, window_size=8, causal=causal).eval()
    x = feature_map(2, 16, 5, 7)  # one 7 x 7 window with padding
    with torch.no_grad():
        out = block(x).double()
    t = x.flatten(2).transpose(1, 2).double()
    qkv = t @ block.qkv.weight.double().T + block.qkv.bias.double()
    q, k, v = qkv.unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    if causal:
        s = s.masked_fill(torch.ones(35, 35, dtype=torch.bool).triu(1), float("-inf"))
    o = (s.softmax(-1) @ v).permute(0, 2, 1, 3).flatten(2)
    ref = x.double() + (o @ block.proj.weight.double().T + block.proj.bias.double()).transpose(1, 2).reshape(
        x.shape
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_windows_attend_to_themselves_and_their_sorted_window(causal):
    p, heads, d = 2, 2, 8
    block = build("sinkhorn", 16, heads=heads, window_size=p, causal=causal).eval()
    perturb_(block.sort_net, seed=4, scale=1.0)  # a sharp sort matrix
    x = feature_map(1, 16, 4, 6)  # 2 x 3 windows, no padding
    with torch.no_grad():
        out = block(x).double()
        s = block.sort_matrix(x)[0].double()  # (h, 6, 6)
    qkv = _windows(x.double(), p, 4, 6)[0] @ block.qkv.weight.double().T + block.qkv.bias.double()
    q, k, v = qkv.unflatten(-1, (3, heads, d)).permute(2, 3, 0, 1, 4)  # (h, nW, 4, d)
    res = torch.zeros(heads, 6, 4, d, dtype=torch.float64)
    tri = torch.ones(4, 4, dtype=torch.bool).tril()
    for h in range(heads):
        for i in range(6):
            sk = sum(s[h, i, j] * k[h, j] for j in range(6))
            sv = sum(s[h, i, j] * v[h, j] for j in range(6))  # values sorted as values
            logits = torch.cat([q[h, i] @ k[h, i].T, q[h, i] @ sk.T], -1) / math.sqrt(d)
            if causal:
                logits[:, :4] = logits[:, :4].masked_fill(~tri, float("-inf"))
                if s[h, i].sum() == 0:  # first window-row: nothing sorted in
                    logits[:, 4:] = float("-inf")
            res[h, i] = logits.softmax(-1) @ torch.cat([v[h, i], sv])
    o = res.permute(1, 2, 0, 3).flatten(2) @ block.proj.weight.double().T + block.proj.bias.double()
    o = o.reshape(2, 3, p, p, 16).permute(4, 0, 2, 1, 3).reshape(1, 16, 4, 6)
    torch.testing.assert_close(out, x.double() + o, atol=1e-5, rtol=1e-5)
    if causal:
        rows = torch.arange(6) // 3
        assert (s[:, rows.view(-1, 1) <= rows.view(1, -1)] == 0).all()
        torch.testing.assert_close(s[:, 3:].sum(-1), torch.ones(heads, 3, dtype=torch.float64))


def test_causal_sorting_never_sees_the_future():
    block = build("sinkhorn", 16, window_size=2, causal=True).eval()
    perturb_(block.sort_net, seed=5, scale=1.0)
    support = raster_jacobian_support(block, 16, 5, 7)
    assert not (support & torch.ones_like(support).triu(1)).any()
    # Sorted windows reach far back (beyond the own window): pixel 33 sees pixel 0.
    assert support[33, 0]


def test_invalid_hyperparameters():
    import visattn

    for kwargs in (dict(window_size=0), dict(temperature=0.0), dict(sinkhorn_iter=0), dict(heads=3)):
        with pytest.raises(ValueError, match="^sinkhorn: "):
            visattn.create_attn("sinkhorn", 16, **kwargs)
