"""Linformer: exact identity with full attention at k = N, the explicit formula, resampled projections."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map

import visattn

C, HEADS = 8, 2


def linear_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) 1-D resampling matrix: linear interpolation with align_corners=False when upsampling, a
    triangle filter widened by the factor when downsampling (PyTorch's antialiased bilinear)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        center = (o + 0.5) * scale
        for i in range(n_in):
            m[o, i] = max(0.0, 1.0 - abs(i + 0.5 - center) / support)
    return m / m.sum(1, keepdim=True)


def reference_output(block, x: torch.Tensor, e: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """x + W_o softmax(Q (E_h K_h)ᵀ/√d) (F_h V_h), with loops; e, f: (heads, k, N)."""
    b, c, h, w = x.shape
    n, d = h * w, c // HEADS
    p = {k: v.double() for k, v in block.state_dict().items()}
    y = x.double().clone()
    for bi in range(b):
        t = x[bi].double().reshape(c, n).T
        q = t @ p["q.weight"].T + p["q.bias"]
        kv = t @ p["kv.weight"].T + p["kv.bias"]
        keys, values = kv[:, :c], kv[:, c:]
        out = torch.zeros(n, c, dtype=torch.float64)
        for hd in range(HEADS):
            sl = slice(hd * d, (hd + 1) * d)
            kp, vp = e[hd] @ keys[:, sl], f[hd] @ values[:, sl]
            for i in range(n):
                weights = torch.softmax(kp @ q[i, sl] / math.sqrt(d), 0)
                out[i, sl] = weights @ vp
        y[bi] += (out @ p["proj.weight"].T + p["proj.bias"]).T.reshape(c, h, w)
    return y


def full_attention(block, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[2] * x.shape[3]
    eye = torch.eye(n, dtype=torch.float64).expand(HEADS, n, n)
    return reference_output(block, x, eye, eye)


@pytest.mark.parametrize("sharing", ["none", "headwise", "key_value"])
def test_k_equals_n_with_identity_projections_is_full_attention(sharing):
    h, w = 3, 5
    block = build("linformer", C, k=h * w, heads=HEADS, sharing=sharing, ref_size=(h, w)).double().eval()
    with torch.no_grad():
        block.e.copy_(torch.eye(h * w).expand_as(block.e))
        if block.f is not None:
            block.f.copy_(torch.eye(h * w).expand_as(block.f))
    x = feature_map(2, C, h, w).double()
    with torch.no_grad():
        got = block(x)
    torch.testing.assert_close(got, full_attention(block, x), atol=1e-10, rtol=1e-10)
    assert (got - x).abs().max() > 1e-3  # not the identity: the attention branch is active


@pytest.mark.parametrize("sharing", ["none", "headwise", "key_value"])
@pytest.mark.parametrize("hw", [(4, 6), (7, 5), (2, 3)], ids=["ref", "up", "down"])
def test_matches_formula_with_resampled_projections(sharing, hw):
    ref = (4, 6)
    block = build("linformer", C, k=5, heads=HEADS, sharing=sharing, ref_size=ref).double().eval()
    h, w = hw
    # E' = I_bilinear(E) · n_ref / N along positions, one matrix per head (or shared).
    i_mat = torch.kron(linear_matrix(h, ref[0]), linear_matrix(w, ref[1]))
    scale = (ref[0] * ref[1]) / (h * w)
    e = (block.e.detach() @ i_mat.T * scale).expand(HEADS, -1, -1)
    f = e if block.f is None else (block.f.detach() @ i_mat.T * scale).expand(HEADS, -1, -1)
    x = feature_map(2, C, h, w).double()
    with torch.no_grad():
        got = block(x)
    torch.testing.assert_close(got, reference_output(block, x, e, f), atol=1e-10, rtol=1e-10)


def test_projection_is_a_weighted_average_at_any_resolution():
    # A constant map projects to the same keys at every resolution when E is smooth (here: constant).
    block = visattn.create_attn("linformer", 16, k=4, ref_size=(8, 8))
    with torch.no_grad():
        block.e.fill_(1.0 / 64)
    for h, w in [(8, 8), (16, 16), (5, 11)]:
        p = block.projection(block.e, h, w)
        torch.testing.assert_close(p.sum(-1), torch.ones(1, 4))


def test_sharing_parameter_counts():
    def n_proj(s):
        return sum(
            p.numel()
            for n, p in visattn.create_attn("linformer", 64, sharing=s).named_parameters()
            if n in ("e", "f")
        )

    per = 256 * 32 * 32
    assert n_proj("key_value") == per and n_proj("headwise") == 2 * per and n_proj("none") == 2 * 2 * per


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"sharing": "layerwise"}, {"heads": 3}, {"ref_size": (0, 4)}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^linformer: "):
        visattn.create_attn("linformer", 32, **kwargs)


def test_has_no_causal_mode():
    assert not visattn.attn_info("linformer").causal
    with pytest.raises(TypeError):
        visattn.create_attn("linformer", 32, causal=True)
