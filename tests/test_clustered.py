"""Clustered / improved-clustered attention: naive Lloyd and per-cluster references, and exact limits."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map

import visattn
from visattn.attn.clustered import hamming_kmeans, hyperplane_codes

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


def naive_lloyd(codes: list[list[int]], n_clusters: int, iterations: int) -> list[int]:
    n = len(codes)
    centroids = [list(codes[c * n // n_clusters]) for c in range(n_clusters)]
    for it in range(iterations):
        assign = []
        for code in codes:
            dists = [sum(a != b for a, b in zip(code, cen)) for cen in centroids]
            assign.append(dists.index(min(dists)))
        if it == iterations - 1:
            return assign
        for c in range(n_clusters):
            members = [codes[i] for i in range(n) if assign[i] == c]
            if members:
                centroids[c] = [1 if sum(bits) > 0 else -1 for bits in zip(*members)]
    return assign


def naive_clustered(block, x, n_clusters):
    q_all, k_all, v_all = _heads(block, x)
    b_, h_, n, d = q_all.shape
    out = torch.zeros_like(q_all)
    for b in range(b_):
        for h in range(h_):
            q, k, v = q_all[b, h], k_all[b, h], v_all[b, h]
            planes = block.planes[h]
            codes = [
                [1 if float(qi @ planes[:-1, t] + planes[-1, t]) > 0 else -1 for t in range(block.bits)]
                for qi in q
            ]
            assign = naive_lloyd(codes, n_clusters, block.iterations)
            for c in set(assign):
                members = [i for i in range(n) if assign[i] == c]
                qc = q[members].mean(0)
                scores = k @ qc / math.sqrt(d)
                attn = scores.softmax(0)
                for i in members:
                    if not block.improved:
                        out[b, h, i] = attn @ v
                        continue
                    top = scores.topk(min(block.topk, n)).indices
                    rest = torch.ones(n, dtype=torch.bool)
                    rest[top] = False
                    exact = (k[top] @ q[i] / math.sqrt(d)).softmax(0) @ v[top]
                    out[b, h, i] = attn[top].sum() * exact + attn[rest] @ v[rest]
    return _finish(block, x, out)


def test_hyperplane_codes_and_lloyd_match_naive():
    g = torch.Generator().manual_seed(0)
    x, planes = torch.randn(2, 40, 5, generator=g), torch.randn(6, 8, generator=g)
    codes = hyperplane_codes(x, planes)
    torch.testing.assert_close(codes, torch.where(x @ planes[:-1] + planes[-1] > 0, 1.0, -1.0))
    # 8 bits over 40 points: duplicate codes, ties and empty clusters all occur.
    got = hamming_kmeans(codes, 6, 5)
    for b in range(2):
        assert got[b].tolist() == naive_lloyd(codes[b].int().tolist(), 6, 5)


@pytest.mark.parametrize("improved", [True, False])
def test_matches_naive_reference(improved):
    block = build(
        "clustered", C, heads=2, clusters=4, topk=5, bits=16, iterations=4, improved=improved
    ).eval()
    x = feature_map(2, C, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(block(x), naive_clustered(block, x, 4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("improved", [True, False])
def test_as_many_clusters_as_tokens_is_full_attention(improved):
    # The default 100 clusters are capped at the 16 tokens: one query per cluster (distinct codes).
    block = build("clustered", C, heads=2, improved=improved, topk=4).eval()
    x = feature_map(2, C, 4, 4)
    with torch.no_grad():
        q = _heads(block, x)[0]
        for h in range(2):
            codes = hyperplane_codes(q[:, h], block.planes[h])
            assert all(len(set(map(tuple, codes[b].tolist()))) == 16 for b in range(2))
        torch.testing.assert_close(block(x), dense(block, x), atol=1e-5, rtol=1e-5)


def test_improved_with_every_key_in_the_top_k_is_full_attention():
    block = build("clustered", C, heads=2, clusters=3, topk=64).eval()
    x = feature_map(2, C, 6, 7)
    with torch.no_grad():
        torch.testing.assert_close(block(x), dense(block, x), atol=1e-5, rtol=1e-5)


def test_error_shrinks_with_more_clusters_and_improved_beats_plain():
    x = feature_map(1, C, 16, 16, seed=3)

    def err(**kw):
        block = build("clustered", C, heads=2, **kw).eval()
        with torch.no_grad():
            block.qkv.weight.mul_(3)
            ref = dense(block, x) - x
            return ((block(x) - x - ref).norm() / ref.norm()).item()

    plain = [err(clusters=c, improved=False) for c in (4, 32, 128)]
    assert all(a > b for a, b in zip(plain, plain[1:])), plain
    improved = [err(clusters=c, topk=16) for c in (4, 32, 128)]
    assert all(a > b for a, b in zip(improved, improved[1:])), improved
    assert all(i < 0.9 * p for i, p in zip(improved, plain)), (improved, plain)


def test_hashes_fixed_in_eval_and_redrawn_in_training():
    block = build("clustered", C, clusters=8)
    x = feature_map(1, C, 8, 8)
    with torch.no_grad():
        block.eval()
        assert torch.equal(block(x), block(x))
        block.train()
        assert not torch.equal(block(x), block(x))


def test_constructor_validation():
    for bad in ({"clusters": 0}, {"iterations": 0}, {"bits": 0}, {"topk": 0}, {"heads": 5}):
        with pytest.raises(ValueError, match="^clustered: "):
            visattn.create_attn("clustered", C, **bad)
