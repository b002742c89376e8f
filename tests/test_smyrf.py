"""SMYRF: a naive per-query reference (XBOX+, E2LSH, balanced clusters, logsumexp merge) and its dense limit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import build, feature_map

import visattn

C = 32


def _heads(block, x):
    b, c, hgt, wid = x.shape
    t = block.norm(x.flatten(2).transpose(1, 2))
    split = lambda z: z.reshape(b, hgt * wid, block.heads, -1).transpose(1, 2)  # noqa: E731
    return [split(z) for z in block.qkv(t).split(c, dim=-1)]


def _finish(block, x, heads_out):
    b, c, hgt, wid = x.shape
    out = block.proj(heads_out.transpose(1, 2).reshape(b, hgt * wid, c))
    return x + out.transpose(1, 2).reshape(b, c, hgt, wid)


def dense(block, x):
    q, k, v = _heads(block, x)
    return _finish(block, x, ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1) @ v)


def naive_smyrf(block, x):
    q_all, k_all, v_all = _heads(block, x)
    b_, h_, n, d = q_all.shape
    c = min(block.cluster_size, n)
    n_pad = -(-n // c) * c
    out = torch.zeros_like(q_all)
    for b in range(b_):
        for h in range(h_):
            q, k, v = q_all[b, h], k_all[b, h], v_all[b, h]
            mq, mk = max(float(qi @ qi) for qi in q), max(float(kj @ kj) for kj in k)
            fq = [torch.cat([qi, qi.new_zeros(1), (mq - qi @ qi).clamp_min(0).sqrt()[None]]) for qi in q]
            gk = [torch.cat([kj, (mk - kj @ kj).clamp_min(0).sqrt()[None], kj.new_zeros(1)]) for kj in k]
            outs, lses = [[] for _ in range(n)], [[] for _ in range(n)]
            for r in range(block.n_hashes):
                a, beta = block.alpha[h, :, r], block.beta[h, 0, r]
                hq = [float(f @ a + beta) for f in fq] + [math.inf] * (n_pad - n)
                hk = [float(g @ a + beta) for g in gk] + [math.inf] * (n_pad - n)
                q_order = sorted(range(n_pad), key=lambda p: (hq[p], p))
                k_order = sorted(range(n_pad), key=lambda p: (hk[p], p))
                for slot, i in enumerate(q_order):
                    if i >= n:
                        continue
                    cluster = slot // c
                    keys = [j for j in k_order[cluster * c : (cluster + 1) * c] if j < n]
                    logits = (k[keys] @ q[i]) / math.sqrt(d)
                    outs[i].append(logits.softmax(0) @ v[keys])
                    lses[i].append(logits.logsumexp(0))
            for i in range(n):
                w = torch.stack(lses[i]).softmax(0)
                out[b, h, i] = (w[:, None] * torch.stack(outs[i])).sum(0)
    return _finish(block, x, out)


@pytest.mark.parametrize("size", [(4, 4), (7, 13)])
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_one_cluster_equals_full_softmax_attention(size, n_hashes):
    block = build("smyrf", C, heads=2, n_hashes=n_hashes, cluster_size=128).eval()
    x = feature_map(2, C, *size)
    with torch.no_grad():
        torch.testing.assert_close(block(x), dense(block, x), atol=1e-5, rtol=1e-5)
        ref = F.scaled_dot_product_attention(*_heads(block, x))  # SDPA's default scale is 1/sqrt(d)
        torch.testing.assert_close(block(x), _finish(block, x, ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(7, 9), (8, 8)])
def test_matches_naive_reference(size):
    # 63 tokens pad to 64 (8 clusters of 8, one padded key and query); 64 tokens need no padding.
    block = build("smyrf", C, heads=2, n_hashes=3, cluster_size=8).eval()
    x = feature_map(2, C, *size)
    with torch.no_grad():
        block.qkv.weight.mul_(3)
        torch.testing.assert_close(block(x), naive_smyrf(block, x), atol=1e-5, rtol=1e-5)


def test_error_shrinks_with_larger_clusters_and_more_hashes():
    x = feature_map(1, C, 16, 16, seed=3)

    def err(**kw):
        block = build("smyrf", C, heads=2, **kw).eval()
        with torch.no_grad():
            block.qkv.weight.mul_(3)
            ref = dense(block, x) - x
            return ((block(x) - x - ref).norm() / ref.norm()).item()

    by_size = [err(n_hashes=2, cluster_size=s) for s in (8, 32, 128)]
    assert all(a > b for a, b in zip(by_size, by_size[1:])), by_size
    by_hashes = [err(n_hashes=r, cluster_size=16) for r in (1, 4, 16)]
    assert all(a > b for a, b in zip(by_hashes, by_hashes[1:])), by_hashes
    assert by_hashes[-1] < 0.7 * by_hashes[0], by_hashes


def test_hashes_fixed_in_eval_and_redrawn_in_training():
    block = build("smyrf", C, cluster_size=8)
    x = feature_map(1, C, 8, 8)
    with torch.no_grad():
        block.eval()
        assert torch.equal(block(x), block(x))
        block.train()
        assert not torch.equal(block(x), block(x))


def test_constructor_validation():
    for bad in ({"n_hashes": 0}, {"cluster_size": 0}, {"heads": 5}):
        with pytest.raises(ValueError, match="^smyrf: "):
            visattn.create_attn("smyrf", C, **bad)


def test_identical_tokens_keep_eval_deterministic_and_batch_independent():
    # A flat region hashes many tokens to the same value: stable sorting keeps clusters fixed.
    block = build("smyrf", C, cluster_size=8).eval()
    x = feature_map(2, C, 8, 8)
    x[:, :, :5] = 0.5
    with torch.no_grad():
        alone = block(x[:1])
        torch.testing.assert_close(block(x)[:1], alone, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(block(torch.cat([x[:1], -x[1:]]))[:1], alone, atol=1e-6, rtol=1e-6)


def _keys_with_ties() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    floats = torch.randint(-3, 3, (3, 2, 50), generator=g).float() / 2
    floats[..., ::7] = float("inf")  # padding sorts last, many of them tie
    floats[0, 0, 1] = float("-inf")
    return [floats, torch.randint(0, 4, (3, 50), generator=g), torch.randn(2, 40, generator=g)]


def test_stable_argsort_export_path_equals_the_stable_sort(monkeypatch):
    from visattn.layers.hashing import sort_with_inverse, stable_argsort

    keys = _keys_with_ties()
    assert keys[0].unique().numel() < 10 and keys[1].unique().numel() == 4  # ties do occur
    expected = [k.argsort(dim=-1, stable=True) for k in keys]
    # Under torch.export the permutation comes from plain sorts of unique keys (ONNX has no stable sort).
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    for k, e in zip(keys, expected):
        assert torch.equal(stable_argsort(k), e)
        perm, inv = sort_with_inverse(k)
        assert torch.equal(perm, e)
        assert torch.equal(perm.gather(-1, inv), torch.arange(k.shape[-1]).expand_as(k))


@pytest.mark.parametrize("size", [(4, 8), (7, 9), (2, 3)])
def test_export_path_equals_eager(monkeypatch, size):
    # The exported graph pads and masks even when H*W is a multiple of the cluster size.
    block = build("smyrf", C, cluster_size=8).eval()
    x = feature_map(2, C, *size)
    x[:, :, :1] = 0.5  # identical tokens: ties in the E2LSH values
    with torch.no_grad():
        eager = block(x)
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
        torch.testing.assert_close(block(x), eager, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_onnx_dynamic_hw_matches_eager(tmp_path):
    pytest.importorskip("onnxruntime")
    from visattn import export

    block = export._perturbed("smyrf", C)
    path = export.export_onnx(block, torch.randn(2, C, 16, 20), tmp_path / "smyrf.onnx", dynamic=True)
    for size in [(1, 1), (5, 5), (13, 9), (7, 33)]:  # one cluster smaller than 32, and padded maps
        assert export.onnx_max_error(path, block, torch.randn(2, C, *size)) <= 1e-4, size
