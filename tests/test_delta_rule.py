"""The chunked delta rule (visattn/layers/delta_rule.py) against the token-by-token recurrence."""

from __future__ import annotations

import pytest
import torch

from visattn.bench import saved_activation_bytes
from visattn.layers.delta_rule import delta_rule, unit_lower_inverse

F64 = torch.float64


def inputs(b=2, h=3, n=37, dk=6, dv=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.rand(b, h, n, dk, generator=g, dtype=dtype) for _ in range(2))
    q, k = q / q.sum(-1, keepdim=True), k / k.sum(-1, keepdim=True)  # DPFP-like: sum-normalised
    v = torch.randn(b, h, n, dv, generator=g, dtype=dtype)
    beta = torch.rand(b, h, n, generator=g, dtype=dtype)
    return q, k, v, beta


def recurrence(q, k, v, beta):
    """W_i = W_{i−1} + β_i (v_i − W_{i−1} k_i) k_iᵀ, y_i = W_i q_i, one token at a time."""
    w = torch.zeros(*v.shape[:-2], v.shape[-1], k.shape[-1], dtype=v.dtype)
    outs = []
    for i in range(k.shape[-2]):
        ki = k[..., i, :]
        v_bar = (w @ ki.unsqueeze(-1)).squeeze(-1)
        w = w + beta[..., i, None, None] * (v[..., i, :] - v_bar).unsqueeze(-1) * ki.unsqueeze(-2)
        outs.append((w @ q[..., i, :].unsqueeze(-1)).squeeze(-1))
    return torch.stack(outs, -2)


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 37, 64])
def test_equals_token_by_token_recurrence(chunk):
    q, k, v, beta = inputs()
    torch.testing.assert_close(
        delta_rule(q, k, v, beta, chunk_size=chunk), recurrence(q, k, v, beta), atol=1e-12, rtol=1e-12
    )


def test_float32_and_gradients_match_recurrence():
    q, k, v, beta = (t.requires_grad_() for t in inputs(n=21))
    ref = recurrence(q, k, v, beta)
    out = delta_rule(q, k, v, beta, chunk_size=8)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    g_ref = torch.autograd.grad((ref * weights).sum(), (q, k, v, beta))
    g_out = torch.autograd.grad((out * weights).sum(), (q, k, v, beta))
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    q32, k32, v32, b32 = (t.detach().float() for t in (q, k, v, beta))
    torch.testing.assert_close(
        delta_rule(q32, k32, v32, b32, chunk_size=8).double(), ref.detach(), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("n", [1, 2, 5, 16, 37, 64])
def test_unit_lower_inverse(n):
    g = torch.Generator().manual_seed(n)
    a = torch.eye(n, dtype=F64) + torch.rand(3, n, n, generator=g, dtype=F64).tril(-1)
    eye = torch.eye(n, dtype=F64).expand_as(a)
    inv = unit_lower_inverse(a)
    torch.testing.assert_close(inv, torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True))
    assert torch.equal(inv.triu(1), torch.zeros_like(inv))


def test_inverse_has_no_subnormals():
    """Entries far from the diagonal decay like (β k·k)^distance: they must be flushed, not left
    as subnormal floats (which make CPU matmuls tens of times slower)."""
    a = torch.eye(64) + torch.diag(torch.full((63,), 1e-3), -1)  # inverse entries (−1e-3)^(t−s)
    inv = unit_lower_inverse(a)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((inv != 0) & (inv.abs() < tiny)).any()
    exact = torch.linalg.solve_triangular(
        a.double(), torch.eye(64, dtype=F64), upper=False, unitriangular=True
    )
    torch.testing.assert_close(inv.double(), exact, atol=1e-7, rtol=0)


def test_identical_keys_stay_stable_in_float32():
    """A flat image region gives many identical keys (k_s·k_t = ‖k‖², the worst case for the
    chunk's triangular system): the float32 chunked form still matches the float64 recurrence."""
    q, k, v, beta = inputs(n=130, dk=8, dv=4)
    k = k[..., :1, :].expand_as(k).clone()
    k = torch.where(torch.arange(8) < 2, k, torch.zeros_like(k))  # 2 active features: ‖k‖² >= 1/2
    k = k / k.sum(-1, keepdim=True)
    ref = recurrence(q, k, v, beta)
    out = delta_rule(q.float(), k.float(), v.float(), beta.float(), chunk_size=64)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_delta_rule_replaces_instead_of_adding():
    """β = 1 with an orthonormal key: a second write to the same key replaces the first value
    (the sum rule would return their sum)."""
    k = torch.zeros(1, 3, 4, dtype=F64)
    k[0, 0, 1] = k[0, 2, 1] = 1.0
    k[0, 1, 3] = 1.0
    v = torch.tensor([[[1.0, 2.0], [5.0, 5.0], [-3.0, 7.0]]], dtype=F64)
    out = delta_rule(k, k, v, torch.ones(1, 3, dtype=F64), chunk_size=2)
    torch.testing.assert_close(out[0], v[0])  # each query k_i reads exactly the value just written


def test_saved_activations_hold_no_per_token_state():
    dk, dv = 64, 32  # DPFP ν = 1 on heads of 32 channels
    sizes, saved = [256, 1024], []
    for n in sizes:
        q, k, v, beta = (t.requires_grad_() for t in inputs(b=1, h=2, n=n, dk=dk, dv=dv, dtype=torch.float32))
        saved.append(saved_activation_bytes(delta_rule, q, k, v, beta, chunk_size=64))
    assert saved[1] < 2 * 1024 * dk * dv * 4  # an (N, Dk, Dv) tensor per head would be 2x this
    assert saved[1] / saved[0] < 4.4  # linear in N (4.06: the inputs, N·L terms and N/L states)


def test_bad_arguments():
    q, k, v, beta = inputs(n=5)
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule(q, k, v, beta, chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, k, v, beta[..., :-1])
