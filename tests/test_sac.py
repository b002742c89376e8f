"""SAC: the learned edge set, attention along it, and the all-edges limit."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map

import visattn
from visattn.attn.sac import distance_encoding


def _qkv(block, tokens):
    q, k, v = block.qkv(tokens).chunk(3, dim=-1)
    b, n, c = q.shape
    return [t.view(b, n, block.heads, c // block.heads).transpose(1, 2) for t in (q, k, v)]


def _reference(block, x, full=False):
    """Candidates, predictor, top-alpha and attention written pixel by pixel, in float64."""
    block = block.double()
    b, c, h, w = x.shape
    tokens = x.double().flatten(2).transpose(1, 2)
    q, k, v = _qkv(block, tokens)
    eq, ek = block.edge_content(tokens).chunk(2, dim=-1)
    ay = ((torch.arange(min(block.anchors, h)) + 0.5) * h / min(block.anchors, h)).floor().long().tolist()
    ax = ((torch.arange(min(block.anchors, w)) + 0.5) * w / min(block.anchors, w)).floor().long().tolist()
    d = c // block.heads
    out = torch.zeros(b, block.heads, h * w, d, dtype=torch.float64)
    for bi in range(b):
        for p in range(h * w):
            i, j = divmod(p, w)
            cands, scores = [], []
            for key in range(h * w):
                ki, kj = divmod(key, w)
                near = abs(ki - i) <= block.window and abs(kj - j) <= block.window
                if not (near or (ki in ay and kj in ax)):
                    continue
                dy, dx = torch.tensor(float(ki - i)).double(), torch.tensor(float(kj - j)).double()
                prior = block.edge_mlp(distance_encoding(dy, dx, block.freqs)).item()
                content = (eq[bi, p] @ ek[bi, key]).item() / math.sqrt(block.edge_dim)
                cands.append(key)
                scores.append(prior + content)
            order = torch.tensor(scores).argsort(descending=True)[: block.alpha]
            edges = list(range(h * w)) if full else [cands[o] for o in order.tolist()]
            for hd in range(block.heads):
                s = k[bi, hd, edges] @ q[bi, hd, p] / math.sqrt(d)
                out[bi, hd, p] = torch.softmax(s, 0) @ v[bi, hd, edges]
    y = block.proj(out.transpose(1, 2).reshape(b, h * w, c))
    block.float()
    return x.double() + y.transpose(1, 2).reshape(b, c, h, w)


def test_output_is_attention_along_the_predicted_edges():
    block = build("sac", 16, heads=2, alpha=5, window=1, anchors=2, seed=3).eval()
    x = feature_map(2, 16, 4, 6, seed=2)
    with torch.no_grad():
        ref = _reference(block, x)
        out = block(x)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_all_edges_equal_full_attention():
    block = build("sac", 16, heads=2, alpha=30, window=6, anchors=2, seed=1).eval()
    x = feature_map(2, 16, 5, 6, seed=4)
    with torch.no_grad():
        out = block(x)
        ref = _reference(block, x, full=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_error_to_full_attention_shrinks_with_the_edge_budget():
    x = feature_map(1, 16, 6, 6, seed=5)
    errors = []
    with torch.no_grad():
        full = build("sac", 16, alpha=36, window=6, seed=2).eval()(x)
        for alpha in (2, 8, 24, 36):
            out = build("sac", 16, alpha=alpha, window=6, seed=2).eval()(x)
            errors.append((out - full).abs().max().item())
    assert errors[0] > errors[1] > errors[2] > errors[3] == 0.0, errors


def test_straight_through_gradient_reaches_the_predictor():
    """The forward pass is hard attention (gate = 1), and the predictor's gradient is the one of an
    explicit einsum attention whose edge values are scaled by 1 + sigmoid(s) - stop_grad(sigmoid(s))."""
    block = build("sac", 16, alpha=4, window=1, anchors=2, seed=0).train()
    x = feature_map(1, 16, 4, 4, seed=1)
    weights = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    (block(x) * weights).sum().backward()
    grad = block.edge_mlp[0].weight.grad.clone()
    assert grad.abs().sum() > 0
    block.zero_grad()
    tokens = x.flatten(2).transpose(1, 2)
    logits, key = block.edge_logits(tokens, 4, 4)
    top, pick = logits.topk(4, dim=-1)
    edges = key.gather(-1, pick[0]).view(1, 1, 16, 4)
    s = torch.sigmoid(top)
    gate = (1 + s - s.detach()).view(1, 1, 16, 4, 1)
    q, k, v = _qkv(block, tokens)
    d = q.shape[-1]
    kg, vg = k[0, :, edges[0, 0]], v[0, :, edges[0, 0]] * gate[0]
    p = torch.softmax(torch.einsum("hnd,hnmd->hnm", q[0], kg) / math.sqrt(d), -1)
    out = torch.einsum("hnm,hnmd->nhd", p, vg).reshape(1, 16, 16)
    y = x + block.proj(out).transpose(1, 2).reshape(1, 16, 4, 4)
    (y * weights).sum().backward()
    torch.testing.assert_close(block.edge_mlp[0].weight.grad, grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{"alpha": 0}, {"window": -1}, {"heads": 5}, {"anchors": 1.5}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^sac: "):
        visattn.create_attn("sac", 16, **kwargs)
