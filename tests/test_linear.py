"""`linear` (Transformers are RNNs): the block against the explicit (φ(Q)φ(K)ᵀ ⊙ M)V definition."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from helpers import build, feature_map

import visattn
from visattn.bench import growth_exponent, saved_activation_bytes
from visattn.layers import sincos_2d


def explicit_linear_block(block, x):
    """x + proj(attn) with attn = (φQφKᵀ ⊙ M)V / (φQφKᵀ ⊙ M)1, written out with an (N, N) matrix."""
    b, c, h, w = x.shape
    n = h * w
    t = block.norm(x.flatten(2).transpose(1, 2)) + sincos_2d(h, w, c, dtype=x.dtype)
    q, k, v = rearrange(block.qkv(t), "b n (three h d) -> three b h n d", three=3, h=block.heads)
    a = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)
    if block.causal:
        a = a * torch.ones(n, n, dtype=x.dtype).tril()
    out = (a @ v) / (a.sum(-1, keepdim=True) + block.eps)
    out = block.proj(rearrange(out, "b h n d -> b n (h d)"))
    return x + out.transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("size", [(5, 7), (9, 16)])
def test_matches_explicit_definition(causal, size):
    # float64: exact to rounding; float32 block against the float64 definition to 1e-5
    block32 = build("linear", 32, causal=causal, chunk_size=16).eval()
    block64 = copy.deepcopy(block32).double()
    x = feature_map(2, 32, *size).double()
    with torch.no_grad():
        ref = explicit_linear_block(block64, x)
        assert (ref - x).abs().max() > 0.1  # perturbed weights: the attention path contributes
        torch.testing.assert_close(block64(x), ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(block32(x.float()).double(), ref, atol=1e-5, rtol=1e-5)


def test_chunk_size_does_not_change_result():
    x = feature_map(1, 32, 11, 13)
    outs = []
    with torch.no_grad():
        for chunk in (1, 16, 64, 143):
            outs.append(build("linear", 32, causal=True, chunk_size=chunk).eval()(x))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


def test_causal_differs_from_non_causal():
    x = feature_map(1, 32, 6, 6)
    with torch.no_grad():
        a = build("linear", 32, causal=False).eval()(x)
        b = build("linear", 32, causal=True).eval()(x)
    # the last raster position sees every token in both forms
    torch.testing.assert_close(a[..., -1, -1], b[..., -1, -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[..., 0, 0], b[..., 0, 0], atol=1e-3)


def test_bad_hyperparameters():
    for kwargs in ({"heads": 5}, {"chunk_size": 0}, {"eps": 0.0}):
        with pytest.raises(ValueError, match="^linear: "):
            visattn.create_attn("linear", 32, **kwargs)


def test_causal_saved_activations_linear_in_n_and_far_below_dense():
    """Training memory: saved bytes grow as N (chunked scan) while dense causal attention grows as N²."""
    c = 64
    torch.manual_seed(0)
    block = visattn.create_attn("linear", c, causal=True).train()

    def dense(x):
        _, _, h, w = x.shape
        t = block.norm(x.flatten(2).transpose(1, 2)) + sincos_2d(h, w, c)
        q, k, v = rearrange(block.qkv(t), "b n (three h d) -> three b h n d", three=3, h=block.heads)
        n = h * w
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        return x + block.proj(rearrange(s.softmax(-1) @ v, "b h n d -> b n (h d)")).transpose(
            1, 2
        ).reshape_as(x)

    sizes, ours = [16, 32, 64], []
    for s in sizes:
        ours.append(saved_activation_bytes(block, torch.randn(1, c, s, s, requires_grad=True)))
    exponent = growth_exponent([s * s for s in sizes], ours)
    dense_bytes = saved_activation_bytes(dense, torch.randn(1, c, 64, 64, requires_grad=True))
    print(f"linear causal saved bytes N=256,1024,4096: {ours}, exponent {exponent:.3f}; dense {dense_bytes}")
    assert exponent <= 1.05
    assert dense_bytes >= 10 * ours[-1]
