"""Lambda layer: content + lambda-convolution position lambdas against explicit loops, timm and
lambda-networks with matched settings."""

from __future__ import annotations

import pytest
import torch
from helpers import build, feature_map

import visattn


def _randomise_running_stats(block, seed=3):
    g = torch.Generator().manual_seed(seed)
    for m in block.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _bn_eval(t, bn):
    shape = (1, -1, 1)
    return (t - bn.running_mean.view(shape)) / (bn.running_var.view(shape) + bn.eps).sqrt() * bn.weight.view(
        shape
    ) + bn.bias.view(shape)


def _reference(block, x):
    """y_n = Σ_k q_n[h, k] (λc[k, v] + λp_n[k, v]) with every sum written out."""
    b, c, hh, ww = x.shape
    n = hh * ww
    kd, ud, vd, heads, r = block.dim_k, block.dim_u, block.dim_v, block.heads, block.r
    proj = torch.einsum("oc,bcn->bon", block.qkv.weight.reshape(-1, c), x.reshape(b, c, n))
    q, k, v = proj.split(block.splits, dim=1)
    q = _bn_eval(q, block.norm_q).reshape(b, heads, kd, n)
    k = k.reshape(b, kd, ud, n)
    v = _bn_eval(v, block.norm_v).reshape(b, vd, ud, hh, ww)
    emb = block.embedding
    y = torch.zeros(b, heads, vd, hh, ww, dtype=x.dtype)
    for bi in range(b):
        soft = torch.zeros_like(k[bi])
        for kk in range(kd):
            for u in range(ud):
                z = sum(k[bi, kk, u, m].exp() for m in range(n))
                for m in range(n):
                    soft[kk, u, m] = k[bi, kk, u, m].exp() / z
        content = torch.zeros(kd, vd, dtype=x.dtype)
        for kk in range(kd):
            for vv in range(vd):
                content[kk, vv] = sum(
                    soft[kk, u, m] * v[bi, vv, u, m // ww, m % ww] for u in range(ud) for m in range(n)
                )
        for i in range(hh):
            for j in range(ww):
                lam = content.clone()
                for di in range(-(r // 2), r // 2 + 1):
                    for dj in range(-(r // 2), r // 2 + 1):
                        if 0 <= i + di < hh and 0 <= j + dj < ww:  # zero padding
                            for u in range(ud):
                                e = emb[:, u, di + r // 2, dj + r // 2]  # (k,)
                                lam += e[:, None] * v[bi, :, u, i + di, j + dj][None, :]
                qn = q[bi, :, :, i * ww + j]  # (h, k)
                y[bi, :, :, i, j] = qn @ lam
    return x + block.gamma * y.reshape(b, c, hh, ww)


@pytest.mark.parametrize("dim_u,r,size", [(1, 3, (4, 5)), (2, 5, (3, 4)), (1, 7, (2, 3))])
def test_equals_explicit_reference(dim_u, r, size):
    block = build("lambda", 8, dim_k=3, heads=2, dim_u=dim_u, r=r).double().eval()
    with torch.no_grad():
        _randomise_running_stats(block)
        block.gamma.fill_(0.8)
        x = feature_map(2, 8, *size).double()
        torch.testing.assert_close(block(x), _reference(block, x), atol=1e-10, rtol=1e-10)


def test_float32_matches_float64_reference():
    block = build("lambda", 8, dim_k=4, heads=2, r=5).eval()
    with torch.no_grad():
        _randomise_running_stats(block)
        block.gamma.fill_(0.8)
        x = feature_map(1, 8, 4, 6)
        ref = _reference(block.double(), x.double())
        torch.testing.assert_close(block.float()(x).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r", [3, 15])  # r > 13 takes the swapped weight-gradient path on CPU
@pytest.mark.parametrize("recompute", [True, False])
def test_position_output_backward_gradcheck(r, recompute):
    from visattn.attn.lambda_layer import _PositionOutput

    g = torch.Generator().manual_seed(0)
    b, heads, kd, vd, ud, hh, ww = 2, 2, 3, 2, 2, 4, 3
    q = torch.randn(b, heads, kd, hh * ww, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b * vd, ud, hh, ww, generator=g, dtype=torch.float64, requires_grad=True)
    e = torch.randn(kd, ud, r, r, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: _PositionOutput.apply(*t, recompute), (q, v, e), fast_mode=True
    )


def test_layer_gradients_equal_plain_autograd(monkeypatch):
    """Both backward modes give the gradients of plain autograd through the same forward ops."""
    import visattn.attn.lambda_layer as mod

    x = feature_map(2, 8, 5, 6).double().requires_grad_()
    w = torch.randn(2, 8, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grads(**kwargs):
        block = build("lambda", 8, dim_k=3, heads=2, r=5, **kwargs).double().train()
        return torch.autograd.grad((block(x) * w).sum(), [x, *block.parameters()])

    ours = [grads(recompute=True), grads(recompute=False)]
    monkeypatch.setattr(
        mod._PositionOutput,
        "apply",
        lambda q, v, e, _: mod._position_output(q, mod._position_lambdas(v, e, q.shape[0])),
    )
    ref = grads()
    for got in ours:
        for a, r_ in zip(got, ref, strict=True):
            torch.testing.assert_close(a, r_, atol=1e-10, rtol=1e-10)


def test_backward_under_bf16_autocast():
    """The recomputing backward runs in the dtype forward used (bf16 here), not the saved fp32."""
    block = build("lambda", 16, dim_k=4, heads=2, r=5).train()
    x = feature_map(2, 16, 6, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    out.float().square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for p in block.parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()


def _ours_like(reference_bn_q, reference_bn_v, c, **kwargs):
    ours = visattn.create_attn("lambda", c, **kwargs).eval()
    with torch.no_grad():
        ours.gamma.fill_(1.0)
        for dst, src in ((ours.norm_q, reference_bn_q), (ours.norm_v, reference_bn_v)):
            dst.load_state_dict(src.state_dict())
    return ours


@pytest.mark.parametrize("r", [9, 23])
def test_matches_timm_lambda_layer(r):
    """timm's LambdaLayer (u = 1) with its lambda-conv bias zeroed (the paper has none) and the
    same weights: ours - x == timm's output."""
    from timm.layers.lambda_layer import LambdaLayer as TimmLambda

    c, heads, dim_k = 32, 4, 16
    torch.manual_seed(0)
    ref = TimmLambda(c, num_heads=heads, dim_head=dim_k, r=r).eval()
    _randomise_running_stats(ref)
    ours = _ours_like(ref.norm_q, ref.norm_v, c, dim_k=dim_k, heads=heads, r=r)
    with torch.no_grad():
        ref.conv_lambda.bias.zero_()
        ours.qkv.weight.copy_(ref.qkv.weight)  # same [q (h k) | k | v] channel split
        ours.embedding.copy_(ref.conv_lambda.weight.squeeze(-1))  # (k, 1, r, r, 1) -> (k, 1, r, r)
        x = feature_map(2, c, 11, 13)
        torch.testing.assert_close(ours(x) - x, ref(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dim_u", [1, 2])
def test_matches_lambda_networks(dim_u):
    """lucidrains' lambda-networks (lambda conv) with its conv bias zeroed; u > 1 needs its
    (u k) / (u v) channel orders permuted to ours, (k u) / (v u)."""
    lambda_networks = pytest.importorskip("lambda_networks")
    c, heads, dim_k, r = 16, 4, 4, 5
    vd = c // heads
    torch.manual_seed(0)
    ref = lambda_networks.LambdaLayer(c, dim_k=dim_k, r=r, heads=heads, dim_u=dim_u).eval()
    _randomise_running_stats(ref)
    # (u v) -> (v u) permutation of value channels
    perm_v = torch.arange(dim_u * vd).reshape(dim_u, vd).t().flatten()
    perm_k = torch.arange(dim_u * dim_k).reshape(dim_u, dim_k).t().flatten()
    ours = _ours_like(ref.norm_q, ref.norm_v, c, dim_k=dim_k, heads=heads, dim_u=dim_u, r=r)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(ours.norm_v, name).copy_(getattr(ref.norm_v, name)[perm_v])
        ours.qkv.weight.copy_(torch.cat([ref.to_q.weight, ref.to_k.weight[perm_k], ref.to_v.weight[perm_v]]))
        ref.pos_conv.bias.zero_()
        ours.embedding.copy_(ref.pos_conv.weight[:, :, 0])  # (k, u, 1, r, r) -> (k, u, r, r)
        x = feature_map(2, c, 6, 7)
        torch.testing.assert_close(ours(x) - x, ref(x), atol=1e-5, rtol=1e-4)


def test_position_lambda_is_local_and_content_global():
    """Every output pixel reads every input pixel (content lambda), but only through a
    permutation-invariant sum outside its r x r scope: swapping two far pixels leaves it unchanged,
    swapping one pixel inside the scope does not (position lambda)."""
    block = build("lambda", 8, dim_k=2, heads=2, r=3).eval()
    x = feature_map(1, 8, 7, 7, requires_grad=True)
    (g,) = torch.autograd.grad(block(x)[0, :, 3, 3].sum(), x)
    assert (g[0].abs().sum(0) > 0).all()
    with torch.no_grad():
        a = feature_map(1, 8, 7, 7, seed=4)
        far, near = a.clone(), a.clone()
        far[..., 5, 5], far[..., 6, 6] = a[..., 6, 6], a[..., 5, 5]
        near[..., 0, 1], near[..., 6, 6] = a[..., 6, 6], a[..., 0, 1]  # (0, 1) is in the scope of (0, 0)
        d_far = (block(a) - block(far))[0, :, 0, 0].abs().max()
        d_near = (block(a) - block(near))[0, :, 0, 0].abs().max()
    assert d_far < 1e-6 < d_near


def test_defaults_and_validation():
    block = visattn.create_attn("lambda", 256)
    assert (block.dim_k, block.heads, block.dim_u, block.r, block.dim_v) == (16, 4, 1, 23, 64)
    for kwargs in ({"heads": 3}, {"r": 4}, {"dim_k": 0}, {"dim_u": 0}):
        with pytest.raises(ValueError, match="^lambda: "):
            visattn.create_attn("lambda", 64, **kwargs)
