"""Reformer LSH attention: a naive per-query reference of the paper's rules, and its dense limit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import build, feature_map

import visattn
from visattn.layers.hashing import angular_buckets, factor_buckets

C = 32


def _heads(block, x):
    """Per-head shared-QK and value tokens, (B, h, N, d) each, and the pre-norm tokens."""
    b, c, hgt, wid = x.shape
    t = block.norm(x.flatten(2).transpose(1, 2))
    qk, v = block.qkv(t).split(c, dim=-1)
    split = lambda z: z.view(b, hgt * wid, block.heads, -1).transpose(1, 2)  # noqa: E731
    return split(qk), split(v)


def _finish(block, x, heads_out):
    b, c, hgt, wid = x.shape
    out = block.proj(heads_out.transpose(1, 2).reshape(b, hgt * wid, c))
    return x + out.transpose(1, 2).reshape(b, c, hgt, wid)


def dense_shared_qk(block, x, causal):
    """Full shared-QK attention with the paper's self rule (logit - 1e5 for i = j)."""
    qk, v = _heads(block, x)
    logits = qk @ F.normalize(qk, dim=-1).transpose(-1, -2)
    n = logits.shape[-1]
    logits = logits - 1e5 * torch.eye(n)
    if causal:
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return _finish(block, x, logits.softmax(-1) @ v)


def naive_lsh(block, x):
    """Loops over samples, heads, rounds and queries; windows, masks and N_ij spelled out."""
    qk_all, v_all = _heads(block, x)
    b_, h_, n, d = qk_all.shape
    m = min(block.chunk_size, n)
    n_pad = -(-n // m) * m
    nc, nb = n_pad // m, block.buckets_for(n_pad)
    out = torch.zeros_like(qk_all)
    for b in range(b_):
        for h in range(h_):
            q = F.pad(qk_all[b, h], (0, 0, 0, n_pad - n))
            v = F.pad(v_all[b, h], (0, 0, 0, n_pad - n))
            k = F.normalize(q, dim=-1)
            buckets = angular_buckets(q, block.rotations[h], factor_buckets(nb)).tolist()
            rounds = len(buckets)
            for r in range(rounds):
                buckets[r] = [bk if p < n else nb for p, bk in enumerate(buckets[r])]
            chunk, rank = [], []
            for r in range(rounds):
                order = sorted(range(n_pad), key=lambda p, r=r: (buckets[r][p], p))
                slot = {p: s for s, p in enumerate(order)}
                chunk.append([slot[p] // m for p in range(n_pad)])
                # causal chunks: rank of a token among the earlier tokens of its bucket, in blocks of m
                rank.append([sum(buckets[r][q] == buckets[r][p] for q in range(p)) // m for p in range(n_pad)])

            def in_window(r, i, j, chunk=chunk, rank=rank, buckets=buckets):
                if block.causal:
                    return buckets[r][i] == buckets[r][j] and 0 <= rank[r][i] - rank[r][j] <= 1
                return (chunk[r][i] - chunk[r][j]) % nc <= 1 and (
                    block.attend_across_buckets or buckets[r][i] == buckets[r][j]
                )

            for i in range(n):
                outs, lses = [], []
                for r in range(rounds):
                    keys, logits = [], []
                    for j in range(n_pad):
                        if not block.causal and (chunk[r][i] - chunk[r][j]) % nc > 1:
                            continue
                        if j == i:
                            keys.append(j)
                            logits.append(q[i] @ k[j] - 1e5)
                            continue
                        if j >= n or (block.causal and j > i) or not in_window(r, i, j):
                            continue
                        count = (
                            1 if block.allow_duplicates else sum(in_window(s, i, j) for s in range(rounds))
                        )
                        keys.append(j)
                        logits.append(q[i] @ k[j] - torch.log(torch.tensor(float(count))))
                    logits = torch.stack(logits)
                    outs.append(logits.softmax(0) @ v[keys])
                    lses.append(logits.logsumexp(0))
                w = torch.stack(lses).softmax(0)
                out[b, h, i] = (w[:, None] * torch.stack(outs)).sum(0)
    return _finish(block, x, out)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("size", [(4, 4), (7, 13)])
def test_one_bucket_equals_full_shared_qk_attention(causal, size):
    # One bucket; 16 tokens fit one chunk, 91 tokens pad to two chunks of 64 that see each other.
    block = build("reformer", C, heads=2, n_buckets=1, n_hashes=3, causal=causal).eval()
    x = feature_map(2, C, *size)
    with torch.no_grad():
        torch.testing.assert_close(block(x), dense_shared_qk(block, x, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"causal": True},
        {"allow_duplicates": True},
        {"attend_across_buckets": False},
        {"causal": True, "n_buckets": 2},
        {"n_buckets": 4, "allow_duplicates": True, "attend_across_buckets": False},
    ],
)
def test_matches_naive_reference(kwargs):
    # 7 x 9 = 63 tokens, chunks of 8: one padded slot, 8 chunks, 16 adaptive buckets.
    block = build("reformer", C, heads=2, n_hashes=3, chunk_size=8, **kwargs).eval()
    with torch.no_grad():
        block.qkv.weight.mul_(4)  # sharper queries: buckets and chunks matter
        x = feature_map(1, C, 7, 9)
        torch.testing.assert_close(block(x), naive_lsh(block, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_hashes", [1, 3])
def test_causal_past_outputs_do_not_depend_on_future_pixels(n_hashes):
    """The paper's sorted chunks let future tokens move chunk boundaries (a leak gradients do not show);
    bucket-aligned causal chunks must not: change every later pixel, the earlier outputs stay."""
    block = build("reformer", C, heads=2, n_hashes=n_hashes, chunk_size=8, causal=True).eval()
    with torch.no_grad():
        block.qkv.weight.mul_(4)
        x = feature_map(1, C, 9, 11, seed=5)
        for cut in (20, 50, 77):
            y = x.flatten(2).clone()
            y[..., cut:] = torch.randn(1, C, y.shape[-1] - cut, generator=torch.Generator().manual_seed(cut))
            y = y.view_as(x)
            a, b = block(x).flatten(2)[..., :cut], block(y).flatten(2)[..., :cut]
            # keys change sorted slots, so sums run in another order: equal up to rounding
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"leak at cut {cut}")


def test_causal_forbids_attending_across_buckets():
    with pytest.raises(ValueError, match="^reformer: causal attention cannot attend across buckets"):
        visattn.create_attn("reformer", C, causal=True, attend_across_buckets=True)
    assert not visattn.create_attn("reformer", C, causal=True).attend_across_buckets


def _rel_error(block, x):
    with torch.no_grad():
        ref = dense_shared_qk(block, x, block.causal) - x
        return ((block(x) - x - ref).norm() / ref.norm()).item()


def test_error_shrinks_with_more_hashes_and_larger_chunks():
    x = feature_map(1, C, 16, 16, seed=3)

    def err(**kw):
        block = build("reformer", C, heads=2, **kw).eval()
        with torch.no_grad():
            block.qkv.weight.mul_(4)
        return _rel_error(block, x)

    by_hashes = [err(n_hashes=r, chunk_size=16) for r in (1, 2, 4, 8)]
    assert by_hashes[-1] < 0.6 * by_hashes[0], by_hashes
    assert all(a > b for a, b in zip(by_hashes, by_hashes[1:])), by_hashes
    by_chunk = [err(n_hashes=2, chunk_size=m) for m in (8, 32, 128)]
    assert all(a > b for a, b in zip(by_chunk, by_chunk[1:])), by_chunk


def test_hashes_fixed_in_eval_and_redrawn_in_training():
    block = build("reformer", C, chunk_size=8)
    x = feature_map(1, C, 8, 8)
    with torch.no_grad():
        block.qkv.weight.mul_(4)
        block.eval()
        assert torch.equal(block(x), block(x))
        block.train()
        assert not torch.equal(block(x), block(x))


def test_constructor_validation():
    for bad in ({"n_buckets": 3}, {"n_buckets": 0}, {"n_hashes": 0}, {"chunk_size": 0}, {"heads": 5}):
        with pytest.raises(ValueError, match="^reformer: "):
            visattn.create_attn("reformer", C, **bad)
