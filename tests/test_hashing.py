"""visattn.layers.hashing against naive references."""

from __future__ import annotations

import torch

from visattn.layers.hashing import (
    angular_buckets,
    attend_lse,
    e2lsh_project,
    factor_buckets,
    gather_tokens,
    hash_draw,
    look_one_back,
    merge_rounds,
    rotation_columns,
    seeded_normal,
    sort_with_inverse,
    xbox_plus,
)


def test_angular_buckets_match_naive_argmax():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 8, generator=g)
    for n_buckets in (1, 2, 8, 512):
        factors = factor_buckets(n_buckets)
        rot = torch.randn(3, 4, 8, max(1, rotation_columns(factors)), generator=g)
        got = angular_buckets(x, rot, factors)
        assert got.shape == (2, 3, 4, 10)
        for b in range(2):
            for h in range(3):
                for r in range(4):
                    for i in range(10):
                        bucket, start, scale = 0, 0, 1
                        for f in factors:
                            if f > 1:
                                proj = x[b, h, i] @ rot[h, r, :, start : start + f // 2]
                                bucket += scale * int(torch.cat([proj, -proj]).argmax())
                            start += f // 2
                            scale *= f
                        assert got[b, h, r, i] == bucket
        assert got.max() < max(1, torch.tensor(factors).prod())


def test_factor_buckets_are_even_and_fit_64_columns():
    assert factor_buckets(128) == (128,)
    for n in range(130, 4097, 2):
        factors = factor_buckets(n)
        assert len(factors) == 2 and all(f % 2 == 0 and f >= 2 for f in factors)
        assert factors[0] * factors[1] <= n
        assert rotation_columns(factors) <= 64


def test_xbox_plus_turns_inner_product_into_distance():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 7, 5, generator=g, dtype=torch.float64) * 3
    k = torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    fq, gk = xbox_plus(q, k)
    mq = q.square().sum(-1).amax(-1)
    mk = k.square().sum(-1).amax(-1)
    dist = torch.cdist(fq, gk).square()
    expected = mq[:, None, None] + mk[:, None, None] - 2 * q @ k.transpose(-1, -2)
    torch.testing.assert_close(dist, expected, atol=1e-9, rtol=1e-9)
    # Padded tokens are left out of the maxima.
    valid = torch.tensor([True] * 5 + [False] * 2)
    q_big = q.clone()
    q_big[:, 5:] *= 100
    fq2, _ = xbox_plus(q_big, k, valid)
    mq_valid = q[:, :5].square().sum(-1).amax(-1)
    torch.testing.assert_close(fq2[:, :5].square().sum(-1), mq_valid[:, None].expand(2, 5))


def test_e2lsh_project_is_affine_projection_per_round():
    g = torch.Generator().manual_seed(2)
    x, alpha, beta = (
        torch.randn(3, 6, 4, generator=g),
        torch.randn(4, 5, generator=g),
        torch.rand(1, 5, generator=g),
    )
    got = e2lsh_project(x, alpha, beta, width=2.0)
    assert got.shape == (3, 5, 6)
    for r in range(5):
        torch.testing.assert_close(got[:, r], (x @ alpha[:, r] + beta[0, r]) / 2.0)


def test_sort_inverse_and_gather_round_trip():
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, 4, 9, generator=g)
    perm, inv = sort_with_inverse(keys)
    assert torch.equal(perm, keys.argsort(-1))
    assert torch.equal(perm.gather(-1, inv), torch.arange(9).expand(2, 3, 4, 9))
    x = torch.randn(2, 3, 9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    sorted_x = gather_tokens(x, perm)
    for b, h, r in [(0, 0, 0), (1, 2, 3), (1, 0, 2)]:
        torch.testing.assert_close(sorted_x[b, h, r], x[b, h][perm[b, h, r]])
    torch.testing.assert_close(gather_tokens(sorted_x, inv), x.unsqueeze(2).expand(2, 3, 4, 9, 5))
    # The gradient is the naive one (each token collects the gradient of all its copies).
    w = torch.randn(2, 3, 4, 9, 5, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((sorted_x * w).sum(), x)
    naive = torch.zeros_like(x)
    for b in range(2):
        for h in range(3):
            for r in range(4):
                naive[b, h].index_add_(0, perm[b, h, r], w[b, h, r])
    torch.testing.assert_close(grad, naive)


def test_look_one_back_pairs_each_chunk_with_its_predecessor():
    x = torch.arange(4 * 3).view(4, 3)
    y = look_one_back(x, 0)
    assert y.shape == (4, 6)
    for c in range(4):
        assert torch.equal(y[c], torch.cat([x[c], x[(c - 1) % 4]]))
    assert torch.equal(look_one_back(x[:1], 0), x[:1])


def test_attend_lse_values_and_gradients():
    g = torch.Generator().manual_seed(4)
    dots = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64)
    dots[..., 0, 2:] = float("-inf")  # masked keys
    dots.requires_grad_(True)
    v = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    out, lse = attend_lse(dots, v)
    torch.testing.assert_close(out, dots.softmax(-1) @ v)
    torch.testing.assert_close(lse, dots.logsumexp(-1))
    wo, wl = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * wo).sum() + (lse * wl).sum(), (dots, v))
    d2 = dots.detach().clone().requires_grad_(True)
    v2 = v.detach().clone().requires_grad_(True)
    ref = torch.autograd.grad(((d2.softmax(-1) @ v2) * wo).sum() + (d2.logsumexp(-1) * wl).sum(), (d2, v2))
    for a, b in zip(got, ref):
        torch.testing.assert_close(torch.nan_to_num(a), torch.nan_to_num(b))


def test_merge_rounds_equals_attention_over_the_union():
    g = torch.Generator().manual_seed(5)
    dots = torch.randn(3, 10, generator=g, dtype=torch.float64)
    v = torch.randn(10, 4, generator=g, dtype=torch.float64)
    parts = [slice(0, 3), slice(3, 7), slice(7, 10)]  # three rounds seeing disjoint keys
    outs, lses = zip(*(attend_lse(dots[:, s], v[s]) for s in parts))
    merged = merge_rounds(torch.stack(outs, 1), torch.stack(lses, 1), dim=1)
    torch.testing.assert_close(merged, dots.softmax(-1) @ v)
    torch.testing.assert_close(merge_rounds(torch.stack(outs, -3), torch.stack(lses, -2), dim=-2), merged)


def test_seeded_draws_are_reproducible_and_redrawn_in_training():
    a, b = seeded_normal((3, 4), 7), seeded_normal((3, 4), 7)
    assert torch.equal(a, b) and not torch.equal(a, seeded_normal((3, 4), 8))
    assert hash_draw(a, training=False) is a
    fresh = hash_draw(a, training=True)
    assert fresh.shape == a.shape and not torch.equal(fresh, a)
    assert (hash_draw(a, training=True, law="uniform") >= 0).all()
