"""The shared linear-attention machinery (visattn/layers/linear_attention.py) against explicit definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import visattn.layers.linear_attention as linear_attention_module
from visattn.layers.linear_attention import (
    RandomFeatures,
    causal_linear_scan,
    elu_feature_map,
    favor_plus_features,
    linear_attention,
    orthogonal_gaussian,
    trig_random_features,
)

F64 = torch.float64


def rand(*shape, seed=0, positive=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = (
        torch.rand(*shape, generator=g, dtype=F64)
        if positive
        else torch.randn(*shape, generator=g, dtype=F64)
    )
    return t * scale


def masked_reference(q, k, v, log_decay=None, causal=True):
    """Σ_j [j <= i] exp(G_i - G_j) (q_i·k_j) v_j with an explicit (N, N) matrix."""
    a = q @ k.transpose(-1, -2)
    if log_decay is not None:
        big_g = log_decay.cumsum(-1)
        a = a * torch.exp(big_g.unsqueeze(-1) - big_g.unsqueeze(-2)).tril()
    return (a.tril() if causal else a) @ v


def normalised_reference(q, k, v, causal, eps=1e-6, log_decay=None):
    ones = torch.ones_like(v[..., :1])
    num = masked_reference(q, k, v, log_decay, causal)
    den = masked_reference(q, k, ones, log_decay, causal)
    return num / (den.clamp_min(0) + eps)


@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 64])
def test_causal_scan_equals_masked_definition(decay, chunk):
    q, k = rand(2, 3, 37, 5, seed=1, positive=True), rand(2, 3, 37, 5, seed=2, positive=True)
    v = rand(2, 3, 37, 4, seed=3)
    g = -rand(2, 3, 37, seed=4, positive=True) if decay else None
    out = causal_linear_scan(q, k, v, g, chunk_size=chunk)
    torch.testing.assert_close(out, masked_reference(q, k, v, g), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("decay", [False, True])
def test_chunked_equals_unchunked_float32(decay):
    q, k = (rand(1, 2, 100, 8, seed=s, positive=True).float() for s in (1, 2))
    v = rand(1, 2, 100, 8, seed=3).float()
    g = -0.1 * rand(1, 2, 100, seed=4, positive=True).float() if decay else None
    whole = linear_attention(q, k, v, causal=True, log_decay=g, chunk_size=100)
    for chunk in (8, 13, 64):
        torch.testing.assert_close(
            linear_attention(q, k, v, causal=True, log_decay=g, chunk_size=chunk), whole, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_equals_explicit_normalised_form(causal):
    q, k = (elu_feature_map(rand(2, 2, 29, 6, seed=s)) for s in (1, 2))
    v = rand(2, 2, 29, 3, seed=3)
    out = linear_attention(q, k, v, causal=causal, chunk_size=8)
    torch.testing.assert_close(out, normalised_reference(q, k, v, causal), atol=1e-12, rtol=1e-10)
    # float32 result against the float64 definition, to 1e-5
    out32 = linear_attention(q.float(), k.float(), v.float(), causal=causal, chunk_size=8)
    torch.testing.assert_close(out32.double(), normalised_reference(q, k, v, causal), atol=1e-5, rtol=1e-5)


def test_decay_requires_causal():
    q = rand(1, 1, 4, 2, positive=True)
    with pytest.raises(ValueError, match="causal"):
        linear_attention(q, q, q, log_decay=torch.zeros(1, 1, 4, dtype=F64))


@pytest.mark.parametrize("decay", [False, True])
def test_recomputed_backward_matches_autograd(decay):
    shapes = [(2, 2, 23, 4), (2, 2, 23, 4), (2, 2, 23, 3)]
    base = [rand(*s, seed=i, positive=i < 2) for i, s in enumerate(shapes)]
    if decay:
        base.append(-rand(2, 2, 23, seed=9, positive=True))
    grads = []
    for recompute in (False, True):
        ins = [t.clone().requires_grad_() for t in base]
        g = ins[3] if decay else None
        out = causal_linear_scan(*ins[:3], g, chunk_size=5, recompute=recompute)
        (out * rand(*out.shape, seed=11)).sum().backward()
        grads.append([t.grad for t in ins])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", ["loop", "doubling"])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 4, 6])
def test_decayed_scan_gradients_equal_the_masked_definition(monkeypatch, backend, recompute, chunk):
    """The chunk-state recurrence, as a loop (the CPU's default) and as a doubling scan (forward and
    recomputed backward): outputs and the gradients of q, k, v and the decay equal those of the explicit
    masked form, with 31, 11, 8 and 6 chunks (non-powers of two too) and strong decays (down to e^-40)."""
    monkeypatch.setattr(linear_attention_module, "DECAY_SCAN", backend)
    shapes = [(2, 2, 31, 4), (2, 2, 31, 4), (2, 2, 31, 3), (2, 2, 31)]
    base = [rand(*s, seed=i, positive=i != 2) for i, s in enumerate(shapes)]
    base[3] = -10 * base[3]
    weights = rand(2, 2, 31, 3, seed=11)
    results = []
    for fn in (lambda *t: causal_linear_scan(*t, chunk_size=chunk, recompute=recompute), masked_reference):
        ins = [t.clone().requires_grad_() for t in base]
        out = fn(*ins)
        results.append([out, *torch.autograd.grad((out * weights).sum(), ins)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_decayed_scan_has_no_loop_over_chunks(monkeypatch):
    """With the doubling backend (the default off the CPU), eight times more chunks (8 -> 64) add log2(8) = 3 doubling steps of ops (about 25 each, forward and
    backward), not one step per chunk."""

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(linear_attention_module, "DECAY_SCAN", "doubling")
    counts = []
    for n in (32, 256):
        ins = [rand(1, 1, n, 3, seed=i, positive=True).requires_grad_() for i in range(3)]
        g = (-rand(1, 1, n, seed=5, positive=True)).requires_grad_()
        with Count() as mode:
            causal_linear_scan(*ins, g, chunk_size=4).sum().backward()
        counts.append(mode.ops)
    assert counts[1] - counts[0] < 150, counts  # a loop over chunks adds over 600


def test_decay_scan_backend_is_checked(monkeypatch):
    monkeypatch.setattr(linear_attention_module, "DECAY_SCAN", "fast")
    q = rand(1, 1, 8, 2, positive=True)
    with pytest.raises(ValueError, match="DECAY_SCAN"):
        causal_linear_scan(q, q, q, -q[..., 0], chunk_size=2)


def test_recomputed_backward_gradcheck():
    ins = [rand(1, 1, 9, 3, seed=i, positive=i < 2).requires_grad_() for i in range(3)]
    g = (-rand(1, 1, 9, seed=5, positive=True)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *t: causal_linear_scan(*t, chunk_size=4, recompute=True), (*ins, g)
    )


def test_autograd_scan_gradcheck_with_decay():
    # gated variants (RFA) learn the decay: the plain autograd path must differentiate it too
    ins = [rand(1, 2, 10, 3, seed=i, positive=i < 2).requires_grad_() for i in range(3)]
    g = (-rand(1, 2, 10, seed=5, positive=True)).requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: causal_linear_scan(*t, chunk_size=4), (*ins, g))


def test_recompute_saves_only_inputs():
    from visattn.bench import saved_activation_bytes

    n, d = 512, 16
    ins = [rand(1, 2, n, d, seed=i, positive=True).float().requires_grad_() for i in range(3)]
    lean = saved_activation_bytes(lambda *t: causal_linear_scan(*t, chunk_size=32, recompute=True), *ins)
    full = saved_activation_bytes(lambda *t: causal_linear_scan(*t, chunk_size=32), *ins)
    assert lean == 3 * 2 * n * d * 4
    assert full > 1.5 * lean


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("decay", [False, True])
def test_causal_scan_never_builds_n_by_d_by_d(decay):
    n, d = 1024, 32
    q, k, v = (rand(1, 1, n, d, seed=s, positive=True).float().requires_grad_() for s in range(3))
    g = -0.01 * rand(1, 1, n, seed=4, positive=True).float() if decay else None
    with _MaxNumel() as mode:
        out = causal_linear_scan(q, k, v, g, chunk_size=64)
        out.sum().backward()
    # the papers' RNN form keeps an (N, D, D) prefix-sum tensor: 32x more than anything here
    assert mode.largest <= n * d * d // 16, mode.largest


def exact_favor_reference(q, k, v, w, causal):
    """FAVOR+ with raw features exp(ωx − ‖x‖²/2), no stabiliser (float64)."""
    s = q.shape[-1] ** -0.25

    def phi(x):
        x = x * s
        return torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True))

    return normalised_reference(phi(q), phi(k), v, causal, eps=0.0)


@pytest.mark.parametrize("causal", [False, True])
def test_favor_plus_stabilised_equals_raw_features(causal):
    w = orthogonal_gaussian(24, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    q, k, v = (rand(2, 2, 40, 8, seed=s) for s in range(3))
    # keys with growing norm make the running-max shift change along the sequence
    k = k * torch.linspace(0.5, 3.0, 40, dtype=F64).unsqueeze(-1)
    fq, fk, g = favor_plus_features(q, k, w, causal=causal)
    assert (g is not None) == causal
    out = linear_attention(fq, fk, v, causal=causal, log_decay=g, chunk_size=16, eps=1e-300)
    torch.testing.assert_close(out, exact_favor_reference(q, k, v, w, causal), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("causal", [False, True])
def test_favor_plus_finite_where_raw_features_overflow_float32(causal):
    w = orthogonal_gaussian(32, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    q, k, v = (rand(1, 1, 64, 8, seed=s) for s in range(3))
    k = k * 12.0  # raw key features reach exp(> 88): inf in float32
    ref = exact_favor_reference(q, k, v, w, causal)
    assert torch.isfinite(ref).all()
    fq, fk, g = favor_plus_features(q.float(), k.float(), w.float(), causal=causal)
    out = linear_attention(fq, fk, v.float(), causal=causal, log_decay=g, chunk_size=16, eps=1e-30)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("feature_fn", [favor_plus_features, trig_random_features], ids=["favor+", "trig"])
def test_causal_key_stabiliser_does_not_leak_the_future(feature_fn):
    w = orthogonal_gaussian(32, 8, generator=torch.Generator().manual_seed(0))
    q, k, v = (rand(1, 1, 40, 8, seed=s, scale=0.5).float() for s in range(3))
    # future keys that would dominate a whole-sequence max: for sin/cos features large norms, for
    # positive features the key that maximises exp(ωᵀk − ‖k‖²/2), k = ω (before the d^-1/4 scale)
    k_future = k.clone()
    if feature_fn is trig_random_features:
        k_future[..., 21:, :] *= 20.0
    else:
        k_future[..., 21:, :] = w[w.norm(dim=1).argmax()] * 8**0.25
    outs = []
    for keys in (k, k_future):
        fq, fk, g = feature_fn(q, keys, w, causal=True)
        outs.append(linear_attention(fq, fk, v, causal=True, log_decay=g, chunk_size=16))
    torch.testing.assert_close(outs[0][..., :21, :], outs[1][..., :21, :], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_trig_features_equal_raw_definition(causal):
    w = orthogonal_gaussian(24, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    q, k, v = (rand(2, 1, 30, 8, seed=s, scale=0.5) for s in range(3))
    s = 8**-0.25

    def phi(x):
        x = x * s
        p = x @ w.T
        return torch.exp(0.5 * (x * x).sum(-1, keepdim=True)) * torch.cat([p.sin(), p.cos()], -1)

    fq, fk, g = trig_random_features(q, k, w, causal=causal)
    out = linear_attention(fq, fk, v, causal=causal, log_decay=g, chunk_size=8, eps=1e-300)
    torch.testing.assert_close(
        out, normalised_reference(phi(q), phi(k), v, causal, eps=0.0), atol=1e-9, rtol=1e-8
    )


def softmax_error_by_features(feature_fn, causal, ms=(16, 32, 64, 128, 256), seeds=4):
    """Mean relative error of the random-feature attention against exact softmax attention."""
    d = 16
    q, k = (rand(2, 2, 256, d, seed=s, scale=0.5) for s in (1, 2))  # ~ q = W·LayerNorm(x) at init
    v = rand(2, 2, 256, d, seed=3)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    errors = []
    for m in ms:
        e = 0.0
        for s in range(seeds):
            w = orthogonal_gaussian(m, d, generator=torch.Generator().manual_seed(100 + s), dtype=F64)
            fq, fk, g = feature_fn(q, k, w, causal=causal)
            out = linear_attention(fq, fk, v, causal=causal, log_decay=g)
            e += ((out - exact).norm() / exact.norm()).item() / seeds
        errors.append(e)
    return errors


@pytest.mark.parametrize("causal", [False, True])
def test_favor_plus_error_shrinks_with_features(causal):
    errors = softmax_error_by_features(favor_plus_features, causal)
    print(f"FAVOR+ causal={causal} relative error m=16..256: {[round(e, 4) for e in errors]}")
    assert all(b <= a * 1.05 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.5 * errors[0], errors


@pytest.mark.parametrize("causal", [False, True])
def test_trig_error_shrinks_with_features(causal):
    errors = softmax_error_by_features(trig_random_features, causal)
    print(f"trig causal={causal} relative error m=16..256: {[f'{e:.4g}' for e in errors]}")
    # with 16 frequencies some denominators come out <= 0 (the instability FAVOR+ removes)
    assert errors[-1] < 0.1 and errors[-1] < errors[0], errors
    assert all(b <= a * 1.05 for a, b in zip(errors[1:], errors[2:], strict=False)), errors


@pytest.mark.parametrize("scaling", ["chi", "sqrt_d"])
def test_orthogonal_gaussian(scaling):
    w = orthogonal_gaussian(40, 16, scaling=scaling, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert w.shape == (40, 16)
    for block in (w[:16], w[16:32], w[32:]):
        gram = block @ block.T
        torch.testing.assert_close(
            gram - torch.diag(torch.diagonal(gram)), torch.zeros_like(gram), atol=1e-10, rtol=0
        )
    norms = w.norm(dim=1)
    if scaling == "sqrt_d":
        torch.testing.assert_close(norms, torch.full_like(norms, 4.0))
    else:
        assert norms.std() > 0.1 and abs(norms.pow(2).mean().item() - 16) < 5
    again = orthogonal_gaussian(
        40, 16, scaling=scaling, generator=torch.Generator().manual_seed(0), dtype=F64
    )
    assert torch.equal(w, again)


def test_orthogonal_gaussian_rows_are_standard_normal_in_distribution():
    # many draws: each coordinate of ω has mean 0 and variance 1 (unbiased softmax-kernel estimate)
    g = torch.Generator().manual_seed(0)
    rows = torch.cat([orthogonal_gaussian(8, 8, generator=g, dtype=F64) for _ in range(400)])
    assert rows.mean().abs() < 0.05
    assert abs(rows.var().item() - 1.0) < 0.05


def test_random_features_redraw_schedule():
    torch.manual_seed(0)
    rf = RandomFeatures(12, 4, redraw_interval=3, seed=7)
    w0 = rf.weight.clone()
    rf.eval()
    for _ in range(5):
        rf.step()
    assert torch.equal(rf.weight, w0) and int(rf.calls) == 0
    rf.train()
    rf.step()
    rf.step()
    assert torch.equal(rf.weight, w0)
    rf.step()
    assert not torch.equal(rf.weight, w0) and int(rf.calls) == 3
    torch.testing.assert_close(rf.weight, rf.draw(1))
    other = RandomFeatures(12, 4, redraw_interval=3, seed=7)
    assert torch.equal(other.weight, w0)  # same seed, same draw, independent of the global RNG
    other.load_state_dict(rf.state_dict())
    assert torch.equal(other.weight, rf.weight)


def test_random_features_seed_from_global_rng():
    torch.manual_seed(3)
    a = RandomFeatures(8, 4).weight
    torch.manual_seed(3)
    b = RandomFeatures(8, 4).weight
    c = RandomFeatures(8, 4).weight
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_elu_feature_map_gradient():
    x = rand(50, seed=0, scale=3.0).requires_grad_()
    assert torch.autograd.gradcheck(elu_feature_map, (x,))
    torch.testing.assert_close(elu_feature_map(x), F.elu(x) + 1)
    assert math.isclose(elu_feature_map(torch.tensor(-1e4)).item(), 0.0, abs_tol=1e-30)


@pytest.mark.parametrize("causal", [False, True])
def test_favor_plus_shifts_carry_no_backward_but_trig_shifts_do(causal):
    """FAVOR+'s stabilising maxima are taken without gradient (their backward was 28 % of slim's step and its
    contribution is within finite-difference tolerance of zero); the trigonometric features keep it (a
    detached shift put performer_v1's gradient 14 % off)."""
    from helpers import autograd_node_names

    from visattn.layers.linear_attention import favor_plus_features, trig_random_features

    q = torch.randn(1, 2, 9, 8, requires_grad=True)
    k = torch.randn(1, 2, 9, 8, requires_grad=True)
    w = torch.randn(16, 8)
    favor = autograd_node_names(*favor_plus_features(q, k, w, causal=causal))
    assert not {n for n in favor if n.startswith(("Amax", "Cummax"))}, favor
    trig = autograd_node_names(*trig_random_features(q, k, w, causal=causal))
    assert {n for n in trig if n.startswith(("Amax", "Cummax", "Max"))}, trig
