import pytest
import torch
from helpers import build, feature_map

import visattn
from visattn.attn.ccnet import criss_cross_attention
from visattn.bench import count_flops


def naive_criss_cross(q, k, v):
    """Per-pixel loop: keys are the pixel's column and row, the pixel itself once."""
    b, _, h, w = q.shape
    out = torch.zeros_like(v)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                keys = [(r, j) for r in range(h)] + [(i, c) for c in range(w) if c != j]
                logits = torch.stack([q[n, :, i, j] @ k[n, :, r, c] for r, c in keys])
                weights = logits.softmax(0)
                out[n, :, i, j] = sum(wt * v[n, :, r, c] for wt, (r, c) in zip(weights, keys))
    return out


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (4, 4)])
def test_criss_cross_matches_pixel_loop(hw):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, *hw, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 5, *hw, generator=g, dtype=torch.float64)
    torch.testing.assert_close(criss_cross_attention(q, k, v), naive_criss_cross(q, k, v), atol=1e-10, rtol=0)


def test_block_with_recurrence_two_is_two_shared_steps():
    block = build("ccnet", 16, recurrence=2).eval()
    one = build("ccnet", 16, recurrence=1).eval()
    x = feature_map(1, 16, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), one(one(x)))


def test_two_recurrences_reach_every_pixel_one_does_not():
    x = feature_map(1, 16, 5, 6, requires_grad=True)
    for recurrence, full in [(1, False), (2, True)]:
        block = build("ccnet", 16, recurrence=recurrence).eval()
        (grad,) = torch.autograd.grad(block(x)[0, :, 0, 0].sum(), x)
        reached = grad[0].abs().sum(0) > 0
        assert bool(reached.all()) is full


def test_no_quadratic_intermediate():
    """FLOPs grow as N·(H+W) = N^1.5, not N^2."""
    block = visattn.create_attn("ccnet", 32).eval()
    with torch.no_grad():
        f = [count_flops(block, feature_map(1, 32, s, s)) for s in (32, 64)]
    assert f[1] / f[0] < 4**1.6


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="recurrence"):
        visattn.create_attn("ccnet", 16, recurrence=0)
