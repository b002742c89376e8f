"""`rfa` (Random Feature Attention, RFA-Gate when causal) against explicit definitions, the
token-by-token gated recurrence, and exact (Gaussian-kernel) softmax attention."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from helpers import build, feature_map

import visattn
from visattn.layers import sincos_2d
from visattn.layers.linear_attention import linear_attention


def block_qkv(block, x):
    _, c, h, w = x.shape
    t = block.norm(x.flatten(2).transpose(1, 2)) + sincos_2d(h, w, c, dtype=x.dtype)
    q, k, v = rearrange(block.qkv(t), "b n (three h d) -> three b h n d", three=3, h=block.heads)
    return t, q, k, v


def explicit_phi(block, x):
    """φ(x) = √(1/m)[sin ωx̂, cos ωx̂] (or √(1/m) ReLU(ωx̂)), ω = σ ⊙ ω̃, per head."""
    m = block.num_features
    w = block.random_features.weight.reshape(block.heads, m, block.head_dim) * block.sigma
    xh = x / x.norm(dim=-1, keepdim=True)
    p = torch.einsum("bhnd,hmd->bhnm", xh, w)
    if block.kernel == "arccos":
        return F.relu(p) / math.sqrt(m)
    return torch.cat([p.sin(), p.cos()], -1) / math.sqrt(m)


def clamp_den(block, den, total):
    """The block's denominator rule, given the exact sum of weights ``total``."""
    if block.bound_denominator and block.kernel == "softmax":
        lo = torch.exp(-2 * block.sigma.abs().amax(-1, keepdim=True) ** 2) * total
        return torch.minimum(torch.maximum(den, lo), total) + block.eps
    return den.clamp_min(0) + block.eps


def explicit_block(block, x):
    """x + proj(attn): non-causal with explicit sums over all tokens; causal as the paper's
    token-by-token recurrence S_t = g_t S_{t−1} + (1 − g_t) φ(k_t) v_tᵀ (z_t likewise)."""
    b, c, h, w = x.shape
    t, q, k, v = block_qkv(block, x)
    pq, pk = explicit_phi(block, q), explicit_phi(block, k)
    n = h * w
    if not block.causal:
        num = torch.einsum("bhnf,bhmf,bhmd->bhnd", pq, pk, v)
        den = torch.einsum("bhnf,bhmf->bhn", pq, pk).unsqueeze(-1)
        out = num / clamp_den(block, den, torch.full_like(den, n))
    else:
        g = torch.sigmoid(block.gate(t)).transpose(1, 2)  # (b, heads, n)
        s = torch.zeros(b, block.heads, pk.shape[-1], v.shape[-1], dtype=x.dtype)
        z = torch.zeros(b, block.heads, pk.shape[-1], dtype=x.dtype)
        total = torch.zeros(b, block.heads, 1, dtype=x.dtype)
        outs = []
        for i in range(n):
            gi = g[..., i, None]
            s = gi[..., None] * s + (1 - gi)[..., None] * pk[:, :, i, :, None] * v[:, :, i, None, :]
            z = gi * z + (1 - gi) * pk[:, :, i]
            total = gi * total + (1 - gi)
            num = torch.einsum("bhf,bhfd->bhd", pq[:, :, i], s)
            den = (pq[:, :, i] * z).sum(-1, keepdim=True)
            outs.append(num / clamp_den(block, den, total))
        out = torch.stack(outs, 2)
    out = block.proj(rearrange(out, "b h n d -> b n (h d)"))
    return x + out.transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"bound_denominator": False}, {"kernel": "arccos"}, {"sigma_init": 2.0}],
    ids=["default", "zero-clamp", "arccos", "sigma2"],
)
def test_matches_explicit_definition_and_recurrence(causal, kwargs):
    block32 = build("rfa", 32, causal=causal, chunk_size=16, num_features=24, **kwargs).eval()
    block64 = copy.deepcopy(block32).double()
    x = feature_map(2, 32, 5, 7).double()
    with torch.no_grad():
        ref = explicit_block(block64, x)
        assert (ref - x).abs().max() > 0.05
        torch.testing.assert_close(block64(x), ref, atol=1e-8, rtol=1e-8)
        if "bound_denominator" in kwargs or "sigma_init" in kwargs:
            return  # denominators near 0 (σ = 2: near the bound exp(−8)·N): float32 is ill-conditioned
        torch.testing.assert_close(block32(x.float()).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_equals_unchunked(causal):
    x = feature_map(2, 32, 9, 11).double()
    ref_block = build("rfa", 32, causal=causal, chunk_size=99).double().eval()
    with torch.no_grad():
        ref = ref_block(x)
        for chunk in (1, 7, 32):
            block = copy.deepcopy(ref_block)
            block.chunk_size = chunk
            torch.testing.assert_close(block(x), ref, atol=1e-10, rtol=1e-10)


def gaussian_softmax(block, t, q, k, v, causal):
    """The exact attention RFA estimates: weights ∝ w_ij exp(−‖σ⊙(q̂_i − k̂_j)‖²/2), with the gate
    weights w_ij = (1 − g_j) Π_{j<s<=i} g_s when causal, as one explicit (N, N) softmax."""
    s = block.sigma[None, :, None]  # (1, h, 1, 1, d)
    qh, kh = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = -0.5 * ((s * (qh.unsqueeze(-2) - kh.unsqueeze(-3))) ** 2).sum(-1)
    if causal:
        a = block.gate(t).transpose(1, 2)
        big_g = F.logsigmoid(a).cumsum(-1)
        logits = logits + big_g.unsqueeze(-1) - big_g.unsqueeze(-2) + F.logsigmoid(-a).unsqueeze(-2)
        n = q.shape[-2]
        logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return rearrange(torch.softmax(logits, -1) @ v, "b h n d -> b n (h d)")


def test_gaussian_kernel_on_unit_vectors_is_softmax():
    """With a scalar σ, exp(−σ²‖q̂ − k̂‖²/2) ∝ exp(σ² q̂·k̂): the target is softmax attention."""
    block = visattn.create_attn("rfa", 32, sigma_init=1.5).eval()
    x = feature_map(2, 32, 6, 6)
    with torch.no_grad():
        t, q, k, v = block_qkv(block, x)
        ours = gaussian_softmax(block, t, q, k, v, False)
        sdpa = F.scaled_dot_product_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, scale=2.25)
    torch.testing.assert_close(ours, rearrange(sdpa, "b h n d -> b n (h d)"), atol=1e-5, rtol=1e-5)


def softmax_error(m, causal, bound=True, seeds=3):
    """Relative Frobenius error, median per-token error and fraction of raw denominator estimates
    <= 0, against the exact softmax (16x16 map, init weights), averaged over feature draws."""
    x = feature_map(2, 32, 16, 16)
    frob = median = nonpos = 0.0
    for s in range(seeds):
        torch.manual_seed(0)  # same projections for every m and seed: only the features change
        block = visattn.create_attn(
            "rfa", 32, num_features=m, seed=100 + s, causal=causal, bound_denominator=bound
        ).eval()
        with torch.no_grad():
            t, q, k, v = block_qkv(block, x)
            ours = block.attend(t)
            exact = gaussian_softmax(block, t, q, k, v, causal)
            qf, kf, log_decay = block.features(q, k, t)
            den = linear_attention(
                qf, kf, torch.ones_like(v[..., :1]), causal=causal, log_decay=log_decay, normalize=False
            )
        frob += ((ours - exact).norm() / exact.norm()).item() / seeds
        median += ((ours - exact).norm(dim=-1) / exact.norm(dim=-1)).median().item() / seeds
        nonpos += (den <= 0).double().mean().item() / seeds
    return frob, median, nonpos


MS = (16, 32, 64, 128, 256)


@pytest.mark.parametrize("causal", [False, True])
def test_error_against_softmax_shrinks_with_features(causal):
    frob, median, nonpos = zip(*[softmax_error(m, causal) for m in MS], strict=True)
    print(
        f"rfa causal={causal} m={MS}: relative error {[f'{e:.4g}' for e in frob]}, median per-token "
        f"{[f'{e:.4g}' for e in median]}, denominators <= 0 {[f'{e:.2%}' for e in nonpos]}"
    )
    assert frob[-1] < 0.35 * frob[0] and median[-1] < 0.35 * median[0], (frob, median)
    assert all(b <= a * 1.05 for a, b in zip(frob, frob[1:], strict=False)), frob
    assert frob[2] < 0.1  # the default m = 64


def test_denominator_bound_removes_blow_ups():
    # Causal with g ≈ 1/2 sums few keys: at m = 16 some raw denominator estimates are <= 0.
    raw, _, nonpos = softmax_error(16, True, bound=False)
    bounded, _, _ = softmax_error(16, True, bound=True)
    print(
        f"rfa causal m=16: denominators <= 0 {nonpos:.2%}; error zero-clamp {raw:.4g}, bounded {bounded:.4g}"
    )
    assert nonpos > 0 and raw > 10 and bounded < 0.5


def test_redraw_in_training_only_and_sigma_learns():
    block = build("rfa", 32, causal=True, seed=3)
    w0 = block.random_features.weight.clone()
    x = feature_map(1, 32, 4, 4)
    with torch.no_grad():
        block.eval()(x)
    assert torch.equal(block.random_features.weight, w0)
    out = block.train()(x)
    assert not torch.equal(block.random_features.weight, w0)  # paper: resampled every training step
    out.square().sum().backward()
    assert block.sigma.grad.abs().sum() > 0 and block.gate.weight.grad.abs().sum() > 0
    assert visattn.create_attn("rfa", 32).gate is None  # the gate exists for the causal form only


@pytest.mark.parametrize(
    "kwargs",
    [{"num_features": 0}, {"kernel": "relu"}, {"sigma_init": 0.0}, {"redraw_interval": -1}, {"heads": 5}],
)
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^rfa: "):
        visattn.create_attn("rfa", 32, **kwargs)
