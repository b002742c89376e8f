"""FANet fast attention: Q̂(K̂ᵀV)/n equals the explicit (Q̂K̂ᵀ/n)V, and the block matches it."""

from __future__ import annotations

import pytest
import torch
from helpers import build, feature_map

import visattn
from visattn.attn.fanet import fast_attention


def _conv_bn(seq: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """1x1 conv (no bias) + eval BN (+ LeakyReLU) written out, for one (C, H, W) sample."""
    conv, bn = seq[0], seq[1]
    y = torch.einsum("oc,chw->ohw", conv.weight[..., 0, 0], x)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    y = (y - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]
    return torch.where(y > 0, y, 0.01 * y) if len(seq) > 2 else y


def test_reordered_product_equals_explicit_on_a_tiny_map():
    """The issue's identity, in float32 to 1e-5, on the block's own Q̂, K̂, V."""
    block = build("fanet", 16, qk_channels=8).eval()
    x = feature_map(2, 16, 3, 4, seed=1)
    with torch.no_grad():
        q, k, v = block.qkv(x)
        n = q.shape[-1]
        explicit = torch.bmm(v, (q.transpose(1, 2) @ k / n).transpose(1, 2))  # y_i = Σ_j (q_i·k_j / n) v_j
        torch.testing.assert_close(fast_attention(q, k, v), explicit, atol=1e-5, rtol=1e-5)


def test_block_matches_explicit_cosine_attention():
    """Pixel by pixel: y_i = (1/n) Σ_j cos(q_i, k_j) v_j, then x + W(y)."""
    c, h, w = 6, 3, 5
    block = build("fanet", c, qk_channels=4).double().eval()
    x = feature_map(2, c, h, w, seed=2).double()
    with torch.no_grad():
        out = block(x)
    for b in range(2):
        q, k, v = (_conv_bn(m, x[b]) for m in (block.query, block.key, block.value))
        y = torch.zeros(c, h, w, dtype=x.dtype)
        for i in range(h):
            for j in range(w):
                for a in range(h):
                    for bb in range(w):
                        cos = q[:, i, j] @ k[:, a, bb] / (q[:, i, j].norm() * k[:, a, bb].norm())
                        y[:, i, j] += cos * v[:, a, bb] / (h * w)
        torch.testing.assert_close(out[b], x[b] + _conv_bn(block.out, y), atol=1e-10, rtol=1e-10)


def test_queries_and_keys_are_unit_vectors_per_position():
    block = build("fanet", 16).eval()
    with torch.no_grad():
        q, k, _ = block.qkv(feature_map(2, 16, 5, 6))
    torch.testing.assert_close(q.norm(dim=1), torch.ones(2, 30))
    torch.testing.assert_close(k.norm(dim=1), torch.ones(2, 30))


def test_output_scale_does_not_grow_with_resolution():
    """With 1/n and cosine similarities, |y_i| <= max_j |v_j|, at any map size."""
    block = build("fanet", 16).eval()
    for size in (4, 16, 32):
        with torch.no_grad():
            q, k, v = block.qkv(feature_map(1, 16, size, size))
            y = fast_attention(q, k, v)
        assert y.abs().max() <= v.abs().max(dim=-1).values.max() + 1e-6


@pytest.mark.parametrize("qk", [0, -2, 1.5])
def test_invalid_qk_channels(qk):
    with pytest.raises(ValueError, match="^fanet: "):
        visattn.create_attn("fanet", 8, qk_channels=qk)
