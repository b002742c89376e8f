"""`slim` (SLiM Performer): the same function and gradients as causal `performer`, with saved
activations that hold no per-chunk state."""

from __future__ import annotations

import pytest
import torch
from helpers import build, feature_map

import visattn
from visattn.bench import growth_exponent, saved_activation_bytes


def twin_performer(slim, **kwargs):
    """A `performer` with slim's weights and random features."""
    other = visattn.create_attn(
        "performer", slim.channels, causal=slim.causal, chunk_size=slim.chunk_size, **kwargs
    )
    other.load_state_dict(slim.state_dict())
    return other.to(next(slim.parameters()).dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_same_output_and_gradients_as_causal_performer(dtype, tol):
    slim = build("slim", 32, causal=True, chunk_size=8).to(dtype).train()
    perf = twin_performer(slim).train()
    x = feature_map(2, 32, 7, 9).to(dtype)
    grads = []
    for block in (slim, perf):
        xi = x.clone().requires_grad_()
        out = block(xi)
        (
            out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        ).sum().backward()
        grads.append((out.detach(), xi.grad, {n: p.grad for n, p in block.named_parameters()}))
    (o1, gx1, gp1), (o2, gx2, gp2) = grads
    assert (o1 - x).abs().max() > 0.1
    torch.testing.assert_close(o1, o2, atol=tol, rtol=tol)
    torch.testing.assert_close(gx1, gx2, atol=tol, rtol=tol)
    for name in gp1:
        torch.testing.assert_close(gp1[name], gp2[name], atol=tol, rtol=tol)


def test_saved_activations_hold_no_chunk_state():
    c = 32
    torch.manual_seed(0)
    slim = visattn.create_attn("slim", c, causal=True).train()
    perf = twin_performer(slim).train()
    slim_nc = visattn.create_attn("slim", c, causal=False).train()
    sizes, lean, full = [16, 32, 64], [], []
    for s in sizes:
        x = torch.randn(1, c, s, s, requires_grad=True)
        lean.append(saved_activation_bytes(slim, x))
        full.append(saved_activation_bytes(perf, x))
    x = torch.randn(1, c, 64, 64, requires_grad=True)
    non_causal = saved_activation_bytes(slim_nc, x)
    exponent = growth_exponent([s * s for s in sizes], lean)
    print(
        f"slim causal saved bytes N=256,1024,4096: {lean} (exponent {exponent:.3f}); "
        f"performer causal {full}; slim non-causal @4096 {non_causal}"
    )
    assert exponent <= 1.02
    # causal SLiM keeps what non-causal attention keeps (features, values, projections' inputs) ...
    assert lean[-1] <= 1.02 * non_causal
    # ... and far less than autograd through the chunked scan (scores, states per chunk)
    assert lean[-1] < 0.6 * full[-1]


@pytest.mark.parametrize("feature_type", ["relu", "elu+1"])
def test_other_feature_types_match_their_definition(feature_type):
    slim = build("slim", 32, causal=True, chunk_size=8, feature_type=feature_type).eval()
    x = feature_map(1, 32, 5, 6)
    if feature_type == "relu":
        ref_block = twin_performer(slim, kernel="relu").eval()
    else:
        ref_block = visattn.create_attn("linear", 32, causal=True, chunk_size=8).eval()
        ref_block.load_state_dict(slim.state_dict(), strict=False)
    with torch.no_grad():
        out, ref = slim(x), ref_block(x)
    assert (out - x).abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bad_feature_type():
    with pytest.raises(ValueError, match="^slim: "):
        visattn.create_attn("slim", 32, feature_type="sqr")
    with pytest.raises(ValueError, match="^slim: "):
        visattn.create_attn("slim", 32, num_features=-3)


def test_causal_outputs_ignore_huge_future_inputs():
    block = build("slim", 32, causal=True, chunk_size=16).eval()
    x = feature_map(1, 32, 6, 7)
    y = x.clone().flatten(2)
    y[..., 21:] = 1e3 * feature_map(1, 32, 6, 7, seed=3).flatten(2)[..., 21:]
    with torch.no_grad():
        a, b = block(x).flatten(2), block(y.reshape_as(x)).flatten(2)
    torch.testing.assert_close(a[..., :21], b[..., :21], atol=1e-5, rtol=1e-5)
