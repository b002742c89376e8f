"""FracTAL: fractal Tanimoto similarity (spatial and channel) against explicit loops, bounds in [0, 1]."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import build, feature_map

import visattn
from visattn.attn.fractal import fractal_tanimoto_with_complement

SMOOTH = 1e-5


def _tanimoto_terms(p: list[float], l: list[float], depth: int) -> float:
    """T^d(p, l) = 1/d Σ_{i<d} p·l / (2^i (p·p + l·l) − (2^{i+1} − 1) p·l), with the smoothing."""
    pl = sum(a * b for a, b in zip(p, l, strict=True))
    pp = sum(a * a for a in p)
    ll = sum(b * b for b in l)
    d = max(depth, 1)
    return sum((pl + SMOOTH) / (2**i * (pp + ll) - (2 ** (i + 1) - 1) * pl + SMOOTH) for i in range(d)) / d


def _ft(p: list[float], l: list[float], depth: int) -> float:
    return 0.5 * (
        _tanimoto_terms(p, l, depth) + _tanimoto_terms([1 - a for a in p], [1 - b for b in l], depth)
    )


def _reference(block, x):
    """The whole block with separate per-group Q/K/V convs, eval-mode BN by hand and loops for T."""
    b, c, h, w = x.shape
    g = block.heads
    cg = c // g
    weight = block.qkv.weight.reshape(g, 3, cg, cg, *block.qkv.weight.shape[-2:])
    bn = block.qkv_norm
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    shift = bn.bias - bn.running_mean * scale
    scale, shift = scale.reshape(g, 3, cg), shift.reshape(g, 3, cg)
    maps = []
    for t in range(3):  # q, k, v as three grouped convs
        w_t = weight[:, t].reshape(c, cg, *weight.shape[-2:])
        y = F.conv2d(x, w_t, padding=block.qkv.padding, groups=g)
        y = y * scale[:, t].reshape(1, c, 1, 1) + shift[:, t].reshape(1, c, 1, 1)
        maps.append(y.sigmoid())
    q, k, v = maps
    att = torch.zeros_like(v)
    for bi in range(b):
        chan = [
            _ft(q[bi, ci].flatten().tolist(), k[bi, ci].flatten().tolist(), block.depth) for ci in range(c)
        ]
        for i in range(h):
            for j in range(w):
                spat = _ft(q[bi, :, i, j].tolist(), k[bi, :, i, j].tolist(), block.depth)
                for ci in range(c):
                    att[bi, ci, i, j] = v[bi, ci, i, j] * 0.5 * (spat + chan[ci])
    n = block.norm
    att = (att - n.running_mean.reshape(1, c, 1, 1)) / (n.running_var.reshape(1, c, 1, 1) + n.eps).sqrt()
    att = att * n.weight.reshape(1, c, 1, 1) + n.bias.reshape(1, c, 1, 1)
    return x * (1 + block.gamma * att)


def _randomise_running_stats(block, seed=3):
    g = torch.Generator().manual_seed(seed)
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("heads,depth", [(1, 5), (2, 3), (1, 0)])
def test_block_equals_explicit_reference(heads, depth):
    block = build("fractal", 8, heads=heads, depth=depth).double().eval()
    with torch.no_grad():
        _randomise_running_stats(block)
        block.gamma.fill_(0.7)
        x = feature_map(2, 8, 3, 4).double()
        torch.testing.assert_close(block(x), _reference(block, x), atol=1e-10, rtol=1e-10)


def test_float32_block_matches_float64_reference():
    block = build("fractal", 16, heads=2).eval()
    with torch.no_grad():
        _randomise_running_stats(block)
        block.gamma.fill_(0.7)
        x = feature_map(1, 16, 5, 5)
        ref = _reference(block.double(), x.double())
        torch.testing.assert_close(block.float()(x).double(), ref, atol=1e-5, rtol=1e-5)


def test_similarity_maps_in_unit_interval_and_shapes():
    block = build("fractal", 32).eval()
    for scale in (1.0, 1e3):  # 1e3 saturates the sigmoids at 0 and 1
        x = feature_map(2, 32, 9, 7) * scale
        with torch.no_grad():
            q, k, _ = block.qkv_maps(x)
            spatial, channel = block.similarities(q, k)
        assert spatial.shape == (2, 1, 9, 7) and channel.shape == (2, 32, 1, 1)
        for t in (spatial, channel):
            assert torch.isfinite(t).all() and t.min() >= 0.0 and t.max() <= 1.0, (scale, t.min(), t.max())


def test_tanimoto_identities():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(4, 6, 3, 3, generator=g, dtype=torch.float64)
    l = torch.rand(4, 6, 3, 3, generator=g, dtype=torch.float64)
    for dims in ((1,), (2, 3)):
        for depth in (1, 5):
            # identical inputs: similarity 1; disjoint binary supports (p, 1 - p): 0
            same = fractal_tanimoto_with_complement(p, p, dims, depth)
            torch.testing.assert_close(same, torch.ones_like(same))
            binary = (p > 0.5).double()
            zero = fractal_tanimoto_with_complement(binary, 1 - binary, dims, depth)
            assert zero.max() < 1e-4
        # depth 1 (and 0) is the classic Tanimoto coefficient p·l / (|p|² + |l|² − p·l) with complement
        pl, pp, ll = ((a * b).sum(dims, keepdim=True) for a, b in ((p, l), (p, p), (l, l)))
        cpl, cpp, cll = (
            (a * b).sum(dims, keepdim=True) for a, b in ((1 - p, 1 - l), (1 - p, 1 - p), (1 - l, 1 - l))
        )
        classic = 0.5 * (
            (pl + SMOOTH) / (pp + ll - pl + SMOOTH) + (cpl + SMOOTH) / (cpp + cll - cpl + SMOOTH)
        )
        for depth in (0, 1):
            torch.testing.assert_close(fractal_tanimoto_with_complement(p, l, dims, depth), classic)
        # deeper fractal levels are sharper: T^d decreases with d for p != l
        t1, t5 = (fractal_tanimoto_with_complement(p, l, dims, d) for d in (1, 5))
        assert (t5 < t1).all()


def test_defaults_and_validation():
    block = visattn.create_attn("fractal", 64)
    assert (block.depth, block.heads, block.qkv.kernel_size) == (5, 1, (3, 3))
    for kwargs in ({"heads": 3}, {"depth": -1}, {"kernel_size": 2}, {"smooth": 0.0}):
        with pytest.raises(ValueError, match="^fractal: "):
            visattn.create_attn("fractal", 64, **kwargs)
