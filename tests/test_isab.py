"""ISAB (Set Transformer): the folded MABs against explicit per-head softmax MABs, and the role of
the 2D positional encoding."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map

import visattn
from visattn.layers import sincos_2d

C = 16


def ref_mab(mab, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MAB(X, Y) = LN(H + ReLU(rFF(H))), H = LN(X + concat_h(softmax(q_h k_hᵀ / sqrt(d)) v_h) W^O),
    written out head by head with an explicit softmax."""
    heads = mab.heads
    dim = x.shape[-1]
    d = dim // heads
    q, k, v = mab.q(x), mab.k(y), mab.v(y)
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d)
        weights = logits.exp() / logits.exp().sum(-1, keepdim=True)
        outs.append(weights @ v[..., sl])
    h_ = x + mab.o(torch.cat(outs, -1))
    h_ = torch.nn.functional.layer_norm(h_, (dim,), mab.norm1.weight, mab.norm1.bias, mab.norm1.eps)
    z = h_ + torch.relu(mab.rff(h_))
    return torch.nn.functional.layer_norm(z, (dim,), mab.norm2.weight, mab.norm2.bias, mab.norm2.eps)


def ref_block(block, x: torch.Tensor, *, pos: bool = True) -> torch.Tensor:
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    if pos:
        tokens = tokens + sincos_2d(h, w, c, dtype=x.dtype)
    inducing = block.inducing.expand(b, -1, -1)
    summary = ref_mab(block.mab_in, inducing, tokens)
    out = block.proj(ref_mab(block.mab_out, tokens, summary))
    return x + out.transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("heads,m", [(4, 16), (2, 5), (1, 3)])
def test_folded_mabs_match_explicit_mab(heads, m):
    block = build("isab", C, heads=heads, num_inducing=m, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 23, C, generator=g, dtype=torch.float64)
    few = torch.randn(2, m, C, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            block.mab_in.summarise(few, x), ref_mab(block.mab_in, few, x), atol=1e-10, rtol=0
        )
        torch.testing.assert_close(
            block.mab_out.broadcast(x, few), ref_mab(block.mab_out, x, few), atol=1e-10, rtol=0
        )


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (8, 8)])
def test_block_matches_reference(size):
    block = build("isab", C, dtype=torch.float64).eval()
    x = feature_map(2, C, *size).double()
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref_block(block, x), atol=1e-10, rtol=0)


def test_float32_matches_float64_reference():
    block = build("isab", C).eval()
    x = feature_map(2, C, 6, 9)
    with torch.no_grad():
        ref = ref_block(block.double(), x.double()).float()
        block.float()
        torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("recompute", [True, False])
def test_gradients_match_reference(recompute):
    block = build("isab", C, recompute=recompute, dtype=torch.float64).train()
    x = feature_map(1, C, 4, 5).double().requires_grad_(True)
    weights = torch.randn(1, C, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad((block(x) * weights).sum(), [x, *block.parameters()])
    ref = torch.autograd.grad((ref_block(block, x) * weights).sum(), [x, *block.parameters()])
    for a, b_ in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b_, atol=1e-10, rtol=0)


def test_positional_encoding_keeps_layout():
    """Without the encoding ISAB is permutation-equivariant over pixels (the layout is lost); with it,
    permuting the pixels changes more than the order of the outputs."""
    block = build("isab", C, dtype=torch.float64).eval()
    x = feature_map(1, C, 4, 6).double()
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))

    def permute(t):
        return t.flatten(2)[..., perm].reshape(t.shape)

    with torch.no_grad():
        no_pos = ref_block(block, permute(x), pos=False)
        torch.testing.assert_close(no_pos, permute(ref_block(block, x, pos=False)), atol=1e-10, rtol=0)
        gap = (block(permute(x)) - permute(block(x))).abs().max().item()
    assert gap > 1e-2, gap


def test_every_output_sees_every_input():
    block = build("isab", C).eval()
    x = feature_map(1, C, 5, 6, requires_grad=True)
    (grad,) = torch.autograd.grad(block(x)[0, :, 0, 0].sum(), x)
    assert (grad[0].abs().sum(0) > 0).all()


def test_defaults_and_bad_hyperparameters():
    block = visattn.create_attn("isab", 256)
    assert block.num_inducing == 16 and block.heads == 4
    assert block.mab_in.scale == block.mab_out.scale == (256 // 4) ** -0.5  # head dim, not sqrt(dim_V)
    assert visattn.create_attn("isab", 6).heads == 2
    for kwargs in ({"num_inducing": 0}, {"heads": 3}, {"heads": 0}, {"num_inducing": 2.5}):
        with pytest.raises(ValueError, match="^isab: "):
            visattn.create_attn("isab", C, **kwargs)
