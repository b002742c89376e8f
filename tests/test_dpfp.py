"""`dpfp` (DPFP features; delta-rule fast weights when causal) against explicit definitions and
the token-by-token fast-weight recurrence."""

from __future__ import annotations

import copy

import pytest
import torch
from einops import rearrange
from helpers import build, feature_map

import visattn
from visattn.attn.dpfp import dpfp_features
from visattn.bench import growth_exponent, saved_activation_bytes
from visattn.layers import sincos_2d


def block_qkv(block, x):
    _, c, h, w = x.shape
    t = block.norm(x.flatten(2).transpose(1, 2)) + sincos_2d(h, w, c, dtype=x.dtype)
    q, k, v = rearrange(block.qkv(t), "b n (three h d) -> three b h n d", three=3, h=block.heads)
    return t, q, k, v


def explicit_dpfp(x, nu):
    """Feature (j−1)·2d + i of φ_ν is r_i · r_{(i−j) mod 2d}, r = [relu(x), relu(−x)]."""
    d2 = 2 * x.shape[-1]
    r = torch.cat([x.clamp_min(0), (-x).clamp_min(0)], -1)
    cols = [r[..., i] * r[..., (i - j) % d2] for j in range(1, nu + 1) for i in range(d2)]
    return torch.stack(cols, -1)


@pytest.mark.parametrize("nu", [1, 2, 3])
def test_feature_map_matches_definition(nu):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    phi = dpfp_features(x, nu)
    assert phi.shape[-1] == 2 * 4 * nu
    torch.testing.assert_close(phi, explicit_dpfp(x, nu), atol=0, rtol=0)
    assert (phi >= 0).all()


def explicit_block(block, x):
    """x + proj(y): causal as the paper's fast-weight programmer, one token at a time,
    v̄ = W φ'(k_i), W += β_i (v_i − v̄) φ'(k_i)ᵀ, y_i = W φ'(q_i), φ' = φ/Σφ; non-causal as
    normalised global linear attention with DPFP features."""
    b, c, h, w = x.shape
    t, q, k, v = block_qkv(block, x)
    pq, pk = explicit_dpfp(q, block.nu), explicit_dpfp(k, block.nu)
    if block.causal:
        pq, pk = pq / pq.sum(-1, keepdim=True), pk / pk.sum(-1, keepdim=True)
        beta = torch.sigmoid(block.beta(t)).transpose(1, 2)
        fast = torch.zeros(b, block.heads, v.shape[-1], pk.shape[-1], dtype=x.dtype)
        outs = []
        for i in range(h * w):
            ki = pk[:, :, i]
            v_bar = torch.einsum("bhvf,bhf->bhv", fast, ki)
            fast = fast + beta[:, :, i, None, None] * torch.einsum("bhv,bhf->bhvf", v[:, :, i] - v_bar, ki)
            outs.append(torch.einsum("bhvf,bhf->bhv", fast, pq[:, :, i]))
        y = torch.stack(outs, 2)
    else:
        a = pq @ pk.transpose(-1, -2)
        y = (a @ v) / (a.sum(-1, keepdim=True) + block.eps)
    out = block.proj(rearrange(y, "b h n d -> b n (h d)"))
    return x + out.transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("nu", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_explicit_definition_and_recurrence(causal, nu):
    block32 = build("dpfp", 32, causal=causal, nu=nu, chunk_size=8).eval()
    block64 = copy.deepcopy(block32).double()
    x = feature_map(2, 32, 5, 7).double()
    with torch.no_grad():
        ref = explicit_block(block64, x)
        assert (ref - x).abs().max() > 0.05
        torch.testing.assert_close(block64(x), ref, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(block32(x.float()).double(), ref, atol=1e-5, rtol=1e-5)


def test_chunked_equals_unchunked():
    x = feature_map(2, 32, 9, 11).double()
    ref_block = build("dpfp", 32, causal=True, chunk_size=99).double().eval()
    with torch.no_grad():
        ref = ref_block(x)
        for chunk in (1, 5, 16, 64):
            block = copy.deepcopy(ref_block)
            block.chunk_size = chunk
            torch.testing.assert_close(block(x), ref, atol=1e-10, rtol=1e-10)


def test_causal_form_depends_on_order_non_causal_does_not():
    """Permuting the tokens permutes the non-causal output (no order, position code aside) but not
    the causal one: the delta rule's order dependence is what the non-causal form drops."""
    outs = {}
    for causal in (False, True):
        block = build("dpfp", 32, causal=causal).eval()
        with torch.no_grad():
            t, q, k, v = block_qkv(block, feature_map(1, 32, 6, 6))
            perm = torch.randperm(36, generator=torch.Generator().manual_seed(0))
            a, b = block.attend(t), block.attend(t[:, perm])
        outs[causal] = (a[:, perm] - b).abs().max().item()
    assert outs[False] < 1e-5 and outs[True] > 1e-2, outs


def test_causal_saved_activations_grow_linearly():
    torch.manual_seed(0)
    block = visattn.create_attn("dpfp", 32, causal=True).train()
    sizes, saved = [16, 32], []
    for s in sizes:
        saved.append(saved_activation_bytes(block, torch.randn(1, 32, s, s, requires_grad=True)))
    exponent = growth_exponent([s * s for s in sizes], saved)
    print(f"dpfp causal saved bytes N=256,1024: {saved} (exponent {exponent:.3f})")
    assert exponent < 1.05
    n, dk, dv = 1024, 2 * block.head_dim * block.nu, block.head_dim
    assert saved[1] < block.heads * n * dk * dv * 4  # less than one (N, Dk, Dv) tensor


def test_beta_only_in_the_causal_form():
    assert visattn.create_attn("dpfp", 32).beta is None
    block = build("dpfp", 32, causal=True)
    out = block(feature_map(1, 32, 4, 5))
    out.square().sum().backward()
    assert block.beta.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [{"nu": 0}, {"nu": 64}, {"nu": 1.5}, {"chunk_size": 0}, {"heads": 3}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^dpfp: "):
        visattn.create_attn("dpfp", 32, **kwargs)
