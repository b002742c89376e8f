"""Informer ProbSparse attention: u = N limit, a per-query reference, lazy means, seeded sampling."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map

from visattn.attn.informer import hashed_uniform


def _qkv(block, x):
    t = x.flatten(2).transpose(1, 2).double()
    qkv = t @ block.qkv.weight.double().T + block.qkv.bias.double()
    return qkv.unflatten(-1, (3, block.heads, block.head_dim)).permute(2, 0, 3, 1, 4)  # (3, b, h, n, d)


def _finish(block, x, heads_out):
    out = heads_out.permute(0, 2, 1, 3).flatten(2) @ block.proj.weight.double().T + block.proj.bias.double()
    return x.double() + out.transpose(1, 2).reshape(x.shape)


def _full(q, k, v, causal):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_all_queries_active_is_full_attention(causal):
    block = build("informer", 16, heads=2, factor=20, causal=causal).eval()
    x = feature_map(2, 16, 5, 7)
    assert block.budget(35) == 35
    with torch.no_grad():
        out = block(x).double()
    q, k, v = _qkv(block, x)
    torch.testing.assert_close(out, _finish(block, x, _full(q, k, v, causal)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_probsparse_matches_a_per_query_reference(causal):
    block = build("informer", 16, heads=2, factor=2, causal=causal).eval()
    x = feature_map(2, 16, 6, 7)
    n = 42
    u = block.budget(n)
    assert u == 2 * math.ceil(math.log(n)) < n
    with torch.no_grad():
        out = block(x).double()
    q, k, v = _qkv(block, x)
    sample = hashed_uniform(n, int(block.seed), 2).topk(u, dim=-1).indices
    res = torch.empty_like(v)
    for b in range(2):
        for h in range(2):
            measure = []
            for i in range(n):
                keys = [j for j in sample[h].tolist() if not causal or j <= i]
                if not keys:
                    measure.append(float("-inf"))
                    continue
                s = torch.stack([q[b, h, i] @ k[b, h, j] for j in keys])
                measure.append((s.max() - s.mean()).item())  # mean over the sampled keys
            active = set(torch.tensor(measure).topk(u).indices.tolist())
            for i in range(n):
                keys = range(i + 1) if causal else range(n)
                if i in active:
                    s = torch.stack([q[b, h, i] @ k[b, h, j] for j in keys]) / math.sqrt(block.head_dim)
                    res[b, h, i] = s.softmax(0) @ v[b, h, list(keys)]
                else:
                    res[b, h, i] = v[b, h, list(keys)].mean(0)  # mean(V); running mean when causal
    torch.testing.assert_close(out, _finish(block, x, res), atol=1e-5, rtol=1e-5)


def test_error_shrinks_with_the_budget():
    x = feature_map(1, 32, 16, 16)
    errors = []
    for factor in (1, 3, 10, 47):
        block = build("informer", 32, factor=factor, seed=0).eval()
        with torch.no_grad():
            errors.append((block(x) - build("informer", 32, factor=1000, seed=0).eval()(x)).norm().item())
    assert errors[0] > errors[1] > errors[2] > errors[3] == 0.0, errors


def test_hashed_sampling_is_seeded_and_uniform():
    a = hashed_uniform(5000, 7, 3)
    torch.testing.assert_close(a, hashed_uniform(5000, 7, 3), atol=0, rtol=0)
    assert not torch.equal(a, hashed_uniform(5000, 8, 3))
    assert not torch.equal(a[0], a[1])  # heads draw different samples
    assert 0 <= a.min() and a.max() < 1
    hist = torch.histc(a, bins=10, min=0, max=1) / a.numel()
    assert (hist - 0.1).abs().max() < 0.01
    assert abs(torch.corrcoef(torch.stack([a[0, :-1], a[0, 1:]]))[0, 1].item()) < 0.05


def test_training_redraws_the_key_sample():
    block = build("informer", 32, factor=1)
    x = feature_map(1, 32, 16, 16)
    with torch.no_grad():
        block.eval()
        torch.testing.assert_close(block(x), block(x), atol=0, rtol=0)
        block.train()
        outs = [block(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_invalid_hyperparameters():
    import visattn

    for kwargs in (dict(factor=0), dict(heads=3), dict(factor=1.5)):
        with pytest.raises(ValueError, match="^informer: "):
            visattn.create_attn("informer", 16, **kwargs)
