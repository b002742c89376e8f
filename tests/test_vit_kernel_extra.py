"""The rfa and dnl ViT mixers (visattn.layers.mixers.kernel_extra, issue 17), and permutohedral's refusal.

Mixers and settings tested here:
- rfa (RfaCore): random Fourier features of the l2-normalised pretrained q, k; new parameter ``core.sigma``
  (paper init 1) and the random-feature buffers ``core.random_features.{seed,calls,weight}``. No dense limit
  (it sees only the directions of q and k, so it cannot approximate the pretrained softmax without
  fine-tuning); its own approximation knob is num_features (error to RFA's exact kernel attention shrinks).
- dnl (DnlCore): whitened pairwise softmax + unary softmax of a projection of the keys; new parameter
  ``core.unary`` (nn.Conv2d's default init, as DNL's code leaves conv_mask). No dense limit (a different
  attention, not an approximation).
- permutohedral: refused (its lattice cannot approximate a kernel between two point sets in a head's
  dimensions); the test checks the message.

Each core is checked against a naive loop reference on a 5 x 7 patch grid with 2 prefix tokens (float64:
outputs and the gradients of q, k, v and the new parameters).
"""

from __future__ import annotations

import math

import pytest
import torch
from vit_helpers import NAME, TINY, random_dense_state

import visattn
from visattn.layers.mixer_cores import DnlCore, RfaCore
from visattn.models.vit import MIXERS, REFUSED, mixer_class

GRID, PREFIX, B, HEADS, D = (5, 7), 2, 2, 2, 8
N = PREFIX + GRID[0] * GRID[1]


def _qkv(seed: int = 0, gain: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(B, HEADS, N, D, generator=g, dtype=torch.float64) * gain).requires_grad_()
        for _ in range(3)
    ]


def _prefix_rows(q, k, v):
    """Prefix queries: exact softmax over every key, written out."""
    out = torch.zeros(B, HEADS, PREFIX, D, dtype=q.dtype)
    for b in range(B):
        for h in range(HEADS):
            for i in range(PREFIX):
                w = torch.softmax(k[b, h] @ q[b, h, i] / math.sqrt(D), dim=0)
                out[b, h, i] = (w[:, None] * v[b, h]).sum(0)
    return out


def _rfa_reference(core: RfaCore, q, k, v):
    m = core.num_features
    w_tilde = core.random_features.weight.to(q.dtype).view(HEADS, m, D)
    patches = torch.zeros(B, HEADS, N - PREFIX, D, dtype=q.dtype)
    for h in range(HEADS):
        omega = core.sigma[h, 0].to(q.dtype) * w_tilde[h]  # (m, d): row r is sigma * w_r
        lower = math.exp(-2.0 * core.sigma[h].abs().max().item() ** 2) * N
        for b in range(B):

            def phi(x, omega=omega):
                p = omega @ (x / x.norm())
                return torch.cat([p.sin(), p.cos()]) / math.sqrt(m)

            keys = [phi(k[b, h, j]) for j in range(N)]
            for i in range(PREFIX, N):
                fq = phi(q[b, h, i])
                kernel = torch.stack([fq @ fk for fk in keys])  # one joint sum: prefix and patch keys
                num = (kernel[:, None] * v[b, h]).sum(0)
                den = kernel.sum().clamp(lower, N)  # the denominator's exact bounds
                patches[b, h, i - PREFIX] = num / (den + core.eps)
    return torch.cat([_prefix_rows(q, k, v), patches], dim=2)


def _dnl_reference(core: DnlCore, q, k, v):
    patches = torch.zeros(B, HEADS, N - PREFIX, D, dtype=q.dtype)
    for b in range(B):
        for h in range(HEADS):
            mq, mk = q[b, h, PREFIX:].mean(0), k[b, h, PREFIX:].mean(0)
            saliency = torch.softmax(torch.stack([core.unary[h] @ k[b, h, j] for j in range(N)]), dim=0)
            unary = (saliency[:, None] * v[b, h]).sum(0)
            for i in range(PREFIX, N):
                logits = torch.stack([(q[b, h, i] - mq) @ (k[b, h, j] - mk) for j in range(N)])
                w = torch.softmax(logits / (math.sqrt(D) * core.temperature), dim=0)
                patches[b, h, i - PREFIX] = (w[:, None] * v[b, h]).sum(0) + unary
    return torch.cat([_prefix_rows(q, k, v), patches], dim=2)


def _check_against(core, reference, q, k, v, params):
    out = core(q, k, v, GRID, PREFIX)
    ref = reference(core, q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    g = torch.Generator().manual_seed(7)
    cot = torch.randn(out.shape, generator=g, dtype=out.dtype)
    inputs = [q, k, v, *params]
    grads = torch.autograd.grad((out * cot).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * cot).sum(), inputs)
    for name, a, r in zip(["q", "k", "v", *(f"param{i}" for i in range(len(params)))], grads, ref_grads):
        # relative to the largest entry: a denominator at its lower bound amplifies rounding by ~1e4
        err, scale = (a - r).abs().max().item(), max(1.0, r.abs().max().item())
        assert err <= 1e-10 * scale, (name, err, scale)


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_rfa_core_equals_naive_reference(sigma):
    # num_features=3 with sigma 2.5 makes the sin/cos estimate leave its bounds for some queries, so the
    # clamp is exercised too.
    core = RfaCore(HEADS * D, HEADS, num_features=3, sigma_init=sigma).double().eval()
    q, k, v = _qkv(0)
    if sigma == 2.5:
        with torch.no_grad():
            omega = core.omega().double()
            from visattn.attn.rfa import rfa_features

            est = rfa_features(q[:, :, PREFIX:], omega) @ rfa_features(k, omega).sum(2, keepdim=True).mT
            lower = torch.exp(-2 * core.sigma.double().amax(-1, keepdim=True) ** 2) * N
            assert ((est < lower) | (est > N)).any()
    _check_against(core, _rfa_reference, q, k, v, [core.sigma])


def test_dnl_core_equals_naive_reference():
    core = DnlCore(HEADS * D, HEADS, temperature=0.5).double().eval()
    q, k, v = _qkv(1, gain=2.0)
    _check_against(core, _dnl_reference, q, k, v, [core.unary])


def test_rfa_features_approach_its_own_kernel_as_num_features_grows():
    """RFA's knob: with more random features the output approaches RFA's exact kernel attention
    (kernel exp(-|sigma (q^ - k^)|^2 / 2) of the unit q, k); the error falls like 1/sqrt(m)."""
    q, k, v = (t.detach() for t in _qkv(2))
    qn, kn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    kernel = torch.exp(-torch.cdist(qn[:, :, PREFIX:], kn).square() / 2)
    exact = (kernel @ v) / kernel.sum(-1, keepdim=True)
    errs = []
    for m in (4, 64, 1024):
        core = RfaCore(HEADS * D, HEADS, num_features=m, seed=3).double().eval()
        out = core(q, k, v, GRID, PREFIX)[:, :, PREFIX:]
        errs.append((out - exact).square().mean().sqrt().item())
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.2 * errs[0], errs


def test_rfa_redraws_in_training_only():
    core = RfaCore(HEADS * D, HEADS, num_features=4, redraw_interval=1)
    q, k, v = (t.detach().float() for t in _qkv(0))
    first = core.random_features.weight.clone()
    core.eval()
    core(q, k, v, GRID, PREFIX)
    assert torch.equal(core.random_features.weight, first)
    core.train()
    core(q, k, v, GRID, PREFIX)
    assert not torch.equal(core.random_features.weight, first)
    assert int(core.random_features.calls) == 1


@pytest.mark.parametrize("core_cls, kwargs", [(RfaCore, {"num_features": 8}), (DnlCore, {})])
def test_batch_independence(core_cls, kwargs):
    core = core_cls(HEADS * D, HEADS, **kwargs).double().eval()
    q, k, v = (t.detach() for t in _qkv(4))
    both = core(q, k, v, GRID, PREFIX)
    alone = core(q[:1], k[:1], v[:1], GRID, PREFIX)
    torch.testing.assert_close(both[:1], alone, rtol=0, atol=1e-12)
    # and changing the other sample does not move this one
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[1] = 3.0 * torch.randn(t[1].shape, generator=torch.Generator().manual_seed(9), dtype=t.dtype)
    torch.testing.assert_close(core(q2, k2, v2, GRID, PREFIX)[:1], both[:1], rtol=0, atol=1e-12)


def _build(attn, path, pretrained=True, **attn_kwargs):
    extra = dict(pretrained_cfg_overlay=dict(file=str(path))) if pretrained else {}
    return visattn.create_model(
        NAME, attn, attn_kwargs=attn_kwargs or None, pretrained=pretrained, **extra, **TINY
    )


NEW_KEYS = {
    "rfa": ["random_features.calls", "random_features.seed", "random_features.weight", "sigma"],
    "dnl": ["unary"],
}


@pytest.mark.parametrize("attn", ["rfa", "dnl"])
@pytest.mark.parametrize("pretrained", [True, False])
def test_new_parameters_keys_init_and_gradients(attn, pretrained, tiny_file):
    torch.manual_seed(0)
    model = _build(attn, tiny_file, pretrained=pretrained).train()
    dense_keys = set(random_dense_state(**TINY))
    new = sorted(set(model.state_dict()) - dense_keys)
    assert new == sorted(f"blocks.{i}.attn.core.{k}" for i in range(2) for k in NEW_KEYS[attn])
    head_dim = TINY["embed_dim"] // TINY["num_heads"]
    for block in model.blocks:
        core = block.attn.core
        if attn == "rfa":
            # the paper starts the learned variance at 1 (after timm's init and after loading timm's weights)
            assert torch.equal(core.sigma, torch.ones(TINY["num_heads"], 1, head_dim))
        else:
            # nn.Conv2d(d, 1, 1)'s default: U(-1/sqrt(d), 1/sqrt(d))
            bound = head_dim**-0.5
            assert core.unary.abs().max() <= bound and core.unary.std() > 0.3 * bound
    x = torch.randn(2, 3, 160, 96, generator=torch.Generator().manual_seed(5))
    # features, not logits: the tiny ViT's head may start at zero and pass no gradient back
    model.forward_features(x).square().mean().backward()
    for block in model.blocks:
        p = block.attn.core.sigma if attn == "rfa" else block.attn.core.unary
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_dnl_unary_init_statistic():
    """At a real ViT-S width the unary init has the std of U(-a, a), a = 1/sqrt(d): a / sqrt(3)."""
    torch.manual_seed(0)
    unary = DnlCore(768, 12).unary
    a = 64**-0.5
    assert unary.abs().max() <= a
    assert abs(unary.std().item() - a / math.sqrt(3)) < 0.1 * a / math.sqrt(3)
    assert abs(unary.mean().item()) < 0.1 * a


def test_mixer_specs_and_no_dense_limit():
    assert MIXERS["rfa"].dense_limit is None and MIXERS["dnl"].dense_limit is None
    assert MIXERS["rfa"].params["num_features"] == 64 and MIXERS["rfa"].params["sigma_init"] == 1.0
    assert MIXERS["dnl"].params == {"temperature": 1.0}
    assert "rfa" not in REFUSED and "dnl" not in REFUSED


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("rfa", {"num_features": 0}, r"rfa: num_features must be a positive int, got 0"),
        ("rfa", {"kernel": "gauss"}, r"rfa: kernel must be 'softmax' or 'arccos'"),
        ("rfa", {"sigma_init": -1.0}, r"rfa: sigma_init must be a finite float > 0"),
        ("rfa", {"redraw_interval": -2}, r"rfa: redraw_interval must be an int >= 0"),
        ("rfa", {"heads": 2}, r"rfa as a ViT attention does not take \['heads'\]"),
        (
            "dnl",
            {"temperature": 0.0},
            r"dnl \(ViT mixer\): temperature must be a finite float > 0 \(1.0 keeps",
        ),
        ("dnl", {"temperature": float("nan")}, r"dnl \(ViT mixer\): temperature must be a finite float > 0"),
        ("dnl", {"reduction": 2}, r"dnl as a ViT attention does not take \['reduction'\]"),
    ],
)
def test_bad_hyperparameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mixer_class(name, **kwargs)


def test_permutohedral_is_refused_with_the_reason():
    with pytest.raises(
        ValueError, match=r"permutohedral cannot be a ViT attention: its lattice filters one point"
    ):
        mixer_class("permutohedral")
    assert "permutohedral" not in MIXERS
