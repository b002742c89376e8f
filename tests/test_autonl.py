"""AutoNL's LightNL block against the explicit (dense-affinity) non-local formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import build, feature_map

import visattn
from visattn.attn.autonl import lightnl_affinity
from visattn.bench import count_flops


def _explicit_lightnl(x: torch.Tensor, qk: int, s: int) -> torch.Tensor:
    """y_i = (1/(H·W)) Σ_j (x_c[i] · x_sc[j]) x_s[j] with the dense affinity, by loops; one sample."""
    c, h, w = x.shape
    keys = [(a, b) for a in range(0, h, s) for b in range(0, w, s)]
    y = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            for a, b in keys:
                affinity = x[:qk, i, j] @ x[:qk, a, b]
                y[:, i, j] += affinity * x[:, a, b]
    return y / (h * w)


@pytest.mark.parametrize("qk,stride,size", [(2, 2, (5, 7)), (8, 1, (4, 3)), (3, 3, (7, 4)), (1, 2, (1, 1))])
def test_affinity_matches_explicit_dense_formula(qk, stride, size):
    x = feature_map(2, 8, *size, seed=1).double()
    y = lightnl_affinity(x, qk, stride)
    for b in range(2):
        torch.testing.assert_close(y[b], _explicit_lightnl(x[b], qk, stride), atol=1e-12, rtol=1e-12)


def test_block_output_matches_explicit():
    block = build("autonl", 8, channel_ratio=0.5, stride=2).double().eval()
    assert block.qk_channels == 4
    x = feature_map(2, 8, 5, 6, seed=2).double()
    with torch.no_grad():
        out = block(x)
    bn = block.norm
    for b in range(2):
        y = _explicit_lightnl(x[b], 4, 2)
        # 3x3 depthwise conv (zero padding) written out, then BN with running statistics.
        padded = F.pad(y, (1, 1, 1, 1))
        z = torch.zeros_like(y)
        for di in range(3):
            for dj in range(3):
                z += block.dwconv.weight[:, 0, di, dj, None, None] * padded[:, di : di + 5, dj : dj + 6]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        z = (z - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]
        torch.testing.assert_close(out[b], x[b] + z, atol=1e-10, rtol=1e-10)


def test_q_kv_order_has_no_n_by_n_product():
    """Q(KᵀV): the matmul FLOPs are exactly 2·(N/s²)·rC·C + 2·N·rC·C (plus the depthwise conv),
    i.e. linear in N; the dense order would need N·(N/s²) terms."""
    c, h, w = 16, 16, 16
    block = build("autonl", c).eval()  # r = 0.25 -> 4 channels, s = 2
    x = feature_map(1, c, h, w)
    with torch.no_grad():
        total = count_flops(block, x)
        dw = count_flops(block.dwconv, x)
    n, n_small, rc = h * w, (h // 2) * (w // 2), 4
    assert total - dw == 2 * n_small * rc * c + 2 * n * rc * c


def test_channel_subset_rounds_like_the_official_code():
    assert visattn.create_attn("autonl", 30, channel_ratio=0.25).qk_channels == 7  # int(7.5)
    assert visattn.create_attn("autonl", 2, channel_ratio=0.25).qk_channels == 1


@pytest.mark.parametrize(
    "kwargs", [{"channel_ratio": 0.0}, {"channel_ratio": 1.5}, {"stride": 0}, {"stride": 1.5}]
)
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^autonl: "):
        visattn.create_attn("autonl", 8, **kwargs)
