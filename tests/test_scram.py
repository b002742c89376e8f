"""SCRAM: PatchMatch candidates, the k = N limit, and recall of the true top-k keys."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map

import visattn


def _qkv(block, x):
    tokens = x.flatten(2).transpose(1, 2)
    q, k, v = block.qkv(tokens).chunk(3, dim=-1)
    b, n, c = q.shape
    h = block.heads
    return [t.view(b, n, h, c // h).transpose(1, 2) for t in (q, k, v)]


def _naive(block, x, index):
    """Softmax over each query's listed keys, one query at a time, in float64."""
    q, k, v = (t.double() for t in _qkv(block, x))
    b, h, n, d = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for p in range(n):
                keys = index[bi, hi, p] if index is not None else torch.arange(n)
                s = k[bi, hi, keys] @ q[bi, hi, p] / math.sqrt(d)
                out[bi, hi, p] = torch.softmax(s, 0) @ v[bi, hi, keys]
    proj = block.proj.weight.double() @ out.transpose(1, 2).reshape(b, n, -1).transpose(1, 2)
    proj = proj + block.proj.bias.double().view(1, -1, 1)
    return x.double() + proj.view_as(x)


def test_k_at_least_n_equals_full_attention():
    block = build("scram", 16, k=64, heads=2, iterations=2).eval()
    x = feature_map(2, 16, 5, 7, seed=3)
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out.double(), _naive(block, x, None), atol=1e-5, rtol=1e-5)


def test_output_is_attention_over_the_found_keys():
    block = build("scram", 16, k=5, heads=2).eval()
    x = feature_map(2, 16, 6, 5, seed=1)
    with torch.no_grad():
        q, k, _ = _qkv(block, x)
        index = block.patchmatch(q, k, 6, 5)
        out = block(x)
    assert index.shape == (2, 2, 30, 5)
    assert (index.sort(-1).values.diff(dim=-1) > 0).all(), "candidates must be distinct"
    torch.testing.assert_close(out.double(), _naive(block, x, index), atol=1e-5, rtol=1e-5)


def _recall(found, true):
    hits = (found.unsqueeze(-1) == true.unsqueeze(-2)).any(-1).float()
    return hits.mean().item()


@pytest.mark.parametrize("smooth", [False, True])
def test_recall_of_true_top_k_beats_random_candidates(smooth):
    torch.manual_seed(0)
    h, w, d, kk = 16, 16, 16, 8
    block = visattn.create_attn("scram", 16, k=kk, iterations=4, seed=7).eval()
    q = torch.randn(1, 1, h * w, d)
    key = torch.randn(1, 1, h * w, d)
    if smooth:  # spatially coherent features, PatchMatch's premise
        grid = key.view(1, h, w, d).permute(0, 3, 1, 2)
        key = torch.nn.functional.avg_pool2d(grid, 3, 1, 1).permute(0, 2, 3, 1).reshape(1, 1, h * w, d)
    true = (q @ key.transpose(-1, -2)).topk(kk, dim=-1).indices
    found = block.patchmatch(q, key, h, w)
    random = torch.rand(1, 1, h * w, h * w).topk(kk, dim=-1).indices
    r_pm, r_rand = _recall(found, true), _recall(random, true)
    assert r_rand < 0.06
    assert r_pm > 5 * r_rand and r_pm > 0.25, (r_pm, r_rand)


def test_more_iterations_raise_recall():
    torch.manual_seed(1)
    q, key = torch.randn(1, 2, 256, 8), torch.randn(1, 2, 256, 8)
    true = (q @ key.transpose(-1, -2)).topk(8, dim=-1).indices
    recalls = []
    for it in (0, 2, 6):
        block = visattn.create_attn("scram", 16, k=8, iterations=it, seed=3).eval()
        recalls.append(_recall(block.patchmatch(q, key, 16, 16), true))
    assert recalls[0] < recalls[1] < recalls[2], recalls


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"iterations": -1}, {"heads": 3}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^scram: "):
        visattn.create_attn("scram", 16, **kwargs)


def test_search_levels_and_mod_are_the_integer_formulas():
    from visattn.attn.scram import _mod, search_levels

    for radius in range(1, 5000):
        assert search_levels(radius).item() == max(1, math.ceil(math.log2(radius)) + 1), radius
    a = torch.arange(1000)
    for n in (1, 7, 64, 999):
        assert torch.equal(_mod(a, n), a % n)


@pytest.mark.slow
def test_onnx_dynamic_hw_matches_eager(tmp_path):
    pytest.importorskip("onnxruntime")
    from visattn import export

    block = export._perturbed("scram", 32)
    path = export.export_onnx(block, torch.randn(2, 32, 16, 20), tmp_path / "scram.onnx", dynamic=True)
    for size in [(1, 1), (3, 2), (13, 9), (20, 16)]:  # k > N, and maps taller than wide
        assert export.onnx_max_error(path, block, torch.randn(2, 32, *size)) <= 1e-4, size
