"""ETC in 2D: l2l window of radius r + one global token per P x P patch (g2g, g2l, l2g full), relative keys.

The references are float64 and loop-based where it matters; label grids are broadcast for speed.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map
from test_sparse_pattern import dense_attention, map_mask, mask_from_sets, receptive_field, window_keys

from visattn.bench import saved_activation_bytes
from visattn.layers import to_tokens

C = 16
H, W = 9, 11
PIXELS = [(0, 0), (0, 5), (4, 0), (4, 5), (8, 10)]


@pytest.mark.parametrize("radius", [0, 1, 2, 3])
def test_receptive_field_is_the_local_radius_without_globals(radius):
    block = build("etc", C, local_radius=radius, relative_max_distance=2, use_global=False)
    for i, j in PIXELS:
        want = window_keys(i, j, H, W, 2 * radius + 1, 1, False)
        assert receptive_field(block, H, W, i, j, C) == want, (i, j)


def test_global_tokens_reach_the_whole_map():
    block = build("etc", C, local_radius=1, patch_size=4)
    for i, j in PIXELS:
        assert receptive_field(block, H, W, i, j, C) == set(range(H * W))


def _reference(block, x):
    """Float64 ETC, naive: patch-mean globals + embedding attend [globals; pixels] (g2g, g2l) with relative
    keys, then pixels attend [window; globals] (l2l, l2g) with relative keys; one softmax each."""
    b, c, h, w = x.shape
    p, r, k, heads = block.patch_size, block.local_radius, block.max_distance, block.heads
    d, n = c // heads, h * w
    xd, t = x.double(), to_tokens(x).double()
    lin = lambda m, v: v @ m.weight.double().T + m.bias.double()  # noqa: E731

    def off(dy, dx):  # ETC's clipped relative position, per axis
        return (dy.clamp(-k, k) + k) * (2 * k + 1) + dx.clamp(-k, k) + k

    link = (2 * k + 1) ** 2
    gh, gw = math.ceil(h / p), math.ceil(w / p)
    patch_of = lambda q: (q // w // p) * gw + (q % w) // p  # noqa: E731

    def rel(q, table, bias, labels):  # q (B, M, C), labels (M, K) -> (B, heads, M, K)
        qh = q.view(b, q.shape[1], heads, d)
        return (
            torch.einsum("bmhd,mkhd->bhmk", qh, table.double()[labels])
            + bias.double()[labels].permute(2, 0, 1)
        ) / math.sqrt(d)

    window = mask_from_sets(n, n, lambda q: window_keys(q // w, q % w, h, w, 2 * r + 1, 1, False))
    pix = torch.arange(n)
    labels = off(pix[None] // w - pix[:, None] // w, pix[None] % w - pix[:, None] % w)
    ctx, mask = t, window
    if block.use_global:
        g0 = (
            torch.stack(
                [
                    xd[:, :, gy * p : (gy + 1) * p, gx * p : (gx + 1) * p].mean((-1, -2))
                    for gy in range(gh)
                    for gx in range(gw)
                ],
                1,
            )
            + block.global_embed.double()
        )
        ng = g0.shape[1]
        gi = torch.arange(ng)
        g2g = off(gi[None] // gw - gi[:, None] // gw, gi[None] % gw - gi[:, None] % gw)
        g2l = torch.tensor([[link + int(patch_of(q) == g) for q in range(n)] for g in range(ng)])
        lab_g = torch.cat([g2g, g2l], 1)
        qg = lin(block.q, g0)
        kk, v = lin(block.kv, torch.cat([g0, t], 1)).chunk(2, dim=-1)
        full = torch.ones(ng, ng + n, dtype=torch.bool)
        att = dense_attention(
            qg, kk, v, full, heads, bias=rel(qg, block.rel_global, block.rel_global_bias, lab_g)
        )
        g = g0 + lin(block.proj_g, att)
        ctx = torch.cat([t, g], 1)
        mask = torch.cat([window, torch.ones(n, ng, dtype=torch.bool)], 1)
        own = torch.tensor([[link + int(patch_of(q) == gg) for gg in range(ng)] for q in range(n)])
        labels = torch.cat([labels, own], 1)
    q = lin(block.q, t)
    kk, v = lin(block.kv, ctx).chunk(2, dim=-1)
    out = dense_attention(q, kk, v, mask, heads, bias=rel(q, block.rel_long, block.rel_long_bias, labels))
    return xd + lin(block.proj, out).transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize(
    "kwargs,hw",
    [
        ({"patch_size": 4, "local_radius": 2, "relative_max_distance": 1}, (H, W)),
        ({"patch_size": 3, "local_radius": 1, "relative_max_distance": 3, "heads": 2}, (H, W)),
        ({"patch_size": 5, "local_radius": 3, "relative_max_distance": 2, "use_global": False}, (7, 6)),
        ({}, (20, 23)),
    ],
)
def test_pattern_and_dense_equivalence(kwargs, hw):
    h, w = hw
    block = build("etc", C, **kwargs).eval()
    with torch.no_grad():  # nonzero per-label biases, so the bias tables are checked too
        block.rel_long_bias.normal_(generator=torch.Generator().manual_seed(3))
        if block.use_global:
            block.rel_global_bias.normal_(generator=torch.Generator().manual_seed(4))
    size = 2 * block.local_radius + 1
    window = mask_from_sets(h * w, h * w, lambda p: window_keys(p // w, p % w, h, w, size, 1, False))
    pattern, _ = block.pattern(h, w)
    got = map_mask(pattern, h, w)
    assert torch.equal(got[:, : h * w], window) and got[:, h * w :].all()
    x = feature_map(2, C, h, w)
    with torch.no_grad():
        torch.testing.assert_close(block(x).double(), _reference(block, x), atol=1e-5, rtol=1e-5)


def test_saved_activations_grow_below_n_to_1_6():
    """l2g is full: the globals per pixel grow with N / P^2, so the growth is above linear but bounded."""
    block = build("etc", C).train()
    mem = [saved_activation_bytes(block, feature_map(1, C, s, s, requires_grad=True)) for s in (32, 64)]
    assert math.log(mem[1] / mem[0]) / math.log(4) <= 1.6


@pytest.mark.slow
def test_saved_activations_at_64_and_128():
    """The issue's sizes (C = 64): exponent <= 1.6 (l2g is full)."""
    block = build("etc", 64).train()
    mem = [saved_activation_bytes(block, feature_map(1, 64, s, s, requires_grad=True)) for s in (64, 128)]
    assert math.log(mem[1] / mem[0]) / math.log(4) <= 1.6


def test_invalid_hyperparameters_raise():
    for kwargs in ({"patch_size": 0}, {"local_radius": -1}, {"relative_max_distance": -1}, {"heads": 3}):
        with pytest.raises(ValueError, match="^etc: "):
            build("etc", C, **kwargs)
