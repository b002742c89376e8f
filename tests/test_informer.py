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
    res, counts = torch.empty_like(v), []
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
            if causal:
                # Active: finite measure in the top ceil(u·(i+1)/n) of the measures <= i, at most 2u of them.
                active = set()
                for i in range(n):
                    rank = math.ceil(u * (i + 1) / n)
                    threshold = sorted(measure[: i + 1], reverse=True)[rank - 1]
                    if math.isfinite(measure[i]) and measure[i] >= threshold and len(active) < 2 * u:
                        active.add(i)
                counts.append(len(active))
            else:
                active = set(torch.tensor(measure).topk(u).indices.tolist())
            for i in range(n):
                keys = range(i + 1) if causal else range(n)
                if i in active:
                    s = torch.stack([q[b, h, i] @ k[b, h, j] for j in keys]) / math.sqrt(block.head_dim)
                    res[b, h, i] = s.softmax(0) @ v[b, h, list(keys)]
                else:
                    res[b, h, i] = v[b, h, list(keys)].mean(0)  # mean(V); running mean when causal
    if causal:
        assert all(0 < c < n for c in counts), counts
    torch.testing.assert_close(out, _finish(block, x, res), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [2, 8, 64])
def test_causal_selection_cap_and_prefix_rank(block):
    """The cap binds on increasing measures (every query is a prefix record); ranks are exact on ties."""
    from visattn.attn.informer import causal_active

    n, u = 40, 3
    slots, keep = causal_active(torch.arange(n, dtype=torch.float32).view(1, 1, n), u, 2 * u, block=block)
    assert slots[0, 0].tolist() == list(range(2 * u)) and keep.all()
    g = torch.Generator().manual_seed(0)
    measure = torch.randn(2, 3, n, generator=g).round()  # many ties
    measure[0, 0, :4] = float("-inf")
    slots, keep = causal_active(measure, u, n, block=block)
    for b, h in [(0, 0), (1, 2)]:
        m = measure[b, h].tolist()
        want = [
            i
            for i in range(n)
            if math.isfinite(m[i])
            and m[i] >= sorted(m[: i + 1], reverse=True)[math.ceil(u * (i + 1) / n) - 1]
        ]
        assert sorted(slots[b, h][keep[b, h]].tolist()) == want
        assert len(set(slots[b, h].tolist())) == n


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


def test_causal_past_outputs_ignore_future_values():
    """Query selection is discrete (no gradient): change every later pixel and compare values."""
    block = build("informer", 16, heads=2, factor=1, causal=True).eval()
    x = feature_map(1, 16, 8, 9, seed=1)
    with torch.no_grad():
        ref = block(x).flatten(2)
        for p in (6, 30, 60):
            y = x.clone().flatten(2)
            y[..., p + 1 :] = 3 * feature_map(1, 16, 1, 71 - p, seed=p).flatten(2)
            out = block(y.view_as(x)).flatten(2)
            torch.testing.assert_close(out[..., : p + 1], ref[..., : p + 1], atol=1e-6, rtol=0)


def test_budget_tensor_equals_the_float_formula():
    from visattn.attn.informer import budget_tensor

    for factor in (1, 5, 20):
        block = build("informer", 16, factor=factor)
        sizes = list(range(1, 3000)) + [round(math.exp(k)) + d for k in range(8, 17) for d in (-1, 0, 1)]
        for n in sizes:
            assert budget_tensor(n, factor).item() == block.budget(n), (factor, n)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_onnx_matches_eager(tmp_path, causal):
    pytest.importorskip("onnxruntime")
    from visattn import export

    torch.manual_seed(0)
    block = build("informer", 32, causal=causal).eval()
    x = torch.randn(2, 32, 16, 20)
    path = export.export_onnx(block, x, tmp_path / "informer.onnx", dynamic=True)
    # Small maps (u = n), and with causal=True maps of 2 and 70 blocks of the prefix scan.
    sizes = [(16, 20), (1, 1), (1, 2), (5, 5), (13, 9), (33, 7), (64, 70)]
    for size in sizes:
        assert export.onnx_max_error(path, block, torch.randn(2, 32, *size)) <= 1e-4, size
