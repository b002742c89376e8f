"""Big Bird in 2D: 3x3 neighbouring patches + global patches + fixed random patches, exactly."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map, raster_jacobian_support
from test_sparse_pattern import dense_attention, map_mask, mask_from_sets, receptive_field

from visattn.attn.bigbird import _mix32
from visattn.bench import saved_activation_bytes
from visattn.layers import to_map, to_tokens

C = 16
H, W, P = 9, 11, 3  # 3 x 4 patches of 3 x 3 (the last patch column half outside the map)
NBH, NBW = 3, 4
PIXELS = [(0, 0), (0, 5), (4, 0), (4, 5), (8, 10)]


def patch(p):
    i, j = divmod(p, W)
    return (i // P) * NBW + j // P


def pixels_of(blocks, causal_upto=None):
    out = {q for q in range(H * W) if patch(q) in blocks}
    return {q for q in out if q <= causal_upto} if causal_upto is not None else out


def neighbours(b):
    r, c = divmod(b, NBW)
    return {
        rr * NBW + cc
        for rr in range(r - 1, r + 2)
        for cc in range(c - 1, c + 2)
        if 0 <= rr < NBH and 0 <= cc < NBW
    }


def paper_keys(p, causal, global_blocks=()):
    """ITC Big Bird on patches: global patches attend everything; the others attend the 3x3 neighbouring
    patches and the global patches (random patches excluded here)."""
    if patch(p) in global_blocks:
        keys = set(range(H * W))
    else:
        keys = pixels_of(neighbours(patch(p)) | set(global_blocks))
    return {q for q in keys if q <= p} if causal else keys


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_global", [0, 2])
def test_receptive_field_is_window_and_global_patches(num_global, causal):
    block = build("bigbird", C, block_size=P, num_global=num_global, num_random=0, causal=causal)
    glob = (0, NBH * NBW - 1) if num_global else ()
    for i, j in PIXELS + [(1, 7), (7, 4)]:
        p = i * W + j
        assert receptive_field(block, H, W, i, j, C) == paper_keys(p, causal, glob), (i, j)


def _mask(block, h, w):
    sparse, dense = block.patterns(h, w)
    return map_mask(sparse, h, w) | map_mask(dense, h, w)


@pytest.mark.parametrize("causal", [False, True])
def test_random_patches_are_whole_fixed_and_outside_window_and_globals(causal):
    block = build("bigbird", C, block_size=P, num_global=2, num_random=2, causal=causal)
    mask = _mask(block, H, W)
    glob = {0, NBH * NBW - 1}
    drawn = []
    for b in range(NBH * NBW):
        if b in glob:
            continue
        p = min(q for q in range(H * W) if patch(q) == b)
        row = set(mask[p].nonzero().flatten().tolist())
        extra = {patch(q) for q in row} - neighbours(b) - glob
        base = neighbours(b) | glob
        allowed = [c for c in range(NBH * NBW) if c not in base and (not causal or c <= b)]
        assert len(extra) == min(2, len(allowed)) and extra <= set(allowed), b
        # Whole patches (up to causality), for every query of the patch.
        for q in (q for q in range(H * W) if patch(q) == b):
            want = pixels_of(base | extra)
            assert set(mask[q].nonzero().flatten().tolist()) == (
                {k for k in want if k <= q} if causal else want
            )
        drawn.append(frozenset(extra))
    assert len(set(drawn)) > 1, "every patch drew the same random patches"
    # Fixed by the seed: another instance (other global RNG state) draws the same; another seed does not.
    same = build("bigbird", C, seed=5, block_size=P, num_global=2, num_random=2, causal=causal)
    assert torch.equal(_mask(same, H, W), mask)
    other = build("bigbird", C, block_size=P, num_global=2, num_random=2, causal=causal, random_seed=1)
    assert not torch.equal(_mask(other, 2 * H, 2 * W), _mask(block, 2 * H, 2 * W))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kwargs,hw", [({"block_size": P, "num_random": 2}, (H, W)), ({}, (20, 27))])
def test_dense_equivalence_and_train_equals_eval(kwargs, hw, causal):
    h, w = hw
    block = build("bigbird", C, causal=causal, **kwargs)
    mask = _mask(block, h, w)
    if kwargs:
        glob = (0, NBH * NBW - 1)
        base = mask_from_sets(h * w, h * w, lambda p: paper_keys(p, causal, glob))
        assert (mask >= base).all()  # the window + global part is there; the rest is the random part
    x = feature_map(2, C, h, w)
    t = to_tokens(x)
    k, v = block.kv(t).chunk(2, dim=-1)
    ref = dense_attention(block.q(t), k, v, mask, block.heads)
    ref = x.double() + to_map(ref @ block.proj.weight.double().T + block.proj.bias.double(), h, w)
    with torch.no_grad():
        out_train = block.train()(x)
        out_eval = block.eval()(x)
    torch.testing.assert_close(out_eval.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_train, out_eval, atol=0, rtol=0)


def test_causal_with_random_patches_never_sees_the_future():
    block = build("bigbird", C, block_size=2, num_random=3, causal=True).eval()
    support = raster_jacobian_support(block, C, 6, 7)
    assert not (support & torch.triu(torch.ones_like(support), diagonal=1)).any()
    assert (support & torch.tril(torch.ones_like(support), diagonal=-1)).any()


def test_saved_activations_grow_linearly():
    block = build("bigbird", C).train()
    mem = [saved_activation_bytes(block, feature_map(1, C, s, s, requires_grad=True)) for s in (32, 64)]
    assert math.log(mem[1] / mem[0]) / math.log(4) <= 1.1


def test_invalid_hyperparameters_raise():
    for kwargs in ({"block_size": 0}, {"window": 2}, {"num_random": -1}, {"heads": 3}):
        with pytest.raises(ValueError, match="^bigbird: "):
            build("bigbird", C, **kwargs)


@pytest.mark.parametrize("causal", [False, True])
def test_random_patches_are_the_r_lowest_hashes(causal):
    """The draw, exactly: the r allowed patches with the lowest (hash, index), ties to the lower index (the
    same rule in torch and onnxruntime)."""
    r = 2
    block = build("bigbird", C, block_size=P, num_global=2, num_random=r, causal=causal)
    mask = _mask(block, H, W)
    k0, k1 = block.rand_key.tolist()
    glob = {0, NBH * NBW - 1}
    for b in set(range(NBH * NBW)) - glob:
        allowed = [c for c in range(NBH * NBW) if c not in neighbours(b) | glob and (not causal or c <= b)]
        score = {c: int(_mix32(_mix32(torch.tensor(b + k0)) ^ torch.tensor(c + k1))) for c in allowed}
        want = set(sorted(allowed, key=lambda c: (score[c], c))[:r])
        p = min(q for q in range(H * W) if patch(q) == b)
        got = {patch(q) for q in mask[p].nonzero().flatten().tolist()} - neighbours(b) - glob
        assert got == want, b


@pytest.mark.parametrize("kwargs,hw", [({}, (5, 6)), ({"block_size": 3, "num_global": 3}, (3, 5))])
def test_fewer_patches_than_globals_is_dense_attention_with_exact_gradients(kwargs, hw):
    """Every patch is global (the global ids repeat): dense attention, each query counted once, also in the
    backward pass."""
    h, w = hw
    block = build("bigbird", C, **kwargs)
    x = feature_map(2, C, h, w, requires_grad=True)
    k, v = (m.double() for m in block.kv(to_tokens(x)).chunk(2, dim=-1))
    full = torch.ones(h * w, h * w, dtype=torch.bool)
    ref = dense_attention(block.q(to_tokens(x)), k, v, full, block.heads)
    ref = x.double() + to_map(ref @ block.proj.weight.double().T + block.proj.bias.double(), h, w)
    out = block(x)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (g,) = torch.autograd.grad((out * weights).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * weights.double()).sum(), x)
    torch.testing.assert_close(g.double(), g_ref.double(), atol=1e-5, rtol=1e-5)
