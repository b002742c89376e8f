"""Memformer block: a per-slot reference, the terminal-state fixed point, forgetting, slot-wise writing,
streaming with a bounded state."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map

from visattn.layers.streaming import split_bands, stream

C = 16


def _softmax_attend(q, k, v, scale):
    return ((q @ k.T) * scale).softmax(-1) @ v


def reference(block, x):
    """Bands, heads and slots by explicit loops (float64)."""
    out = torch.empty_like(x)
    heads, d = block.heads, C // block.heads
    s = math.sqrt(C)

    def bmn(m):
        return m / m.norm() * s

    for b in range(x.shape[0]):
        memory = torch.stack([bmn(v) for v in block.forget_bias])  # (k, C), the terminal state
        for top in range(0, x.shape[2], block.band_rows):
            rows = range(top, min(top + block.band_rows, x.shape[2]))
            band = torch.cat([x[b, :, i, :].T for i in rows])  # raster-order tokens (n, C)
            n, k_slots = band.shape[0], memory.shape[0]
            k, v = block.kv(torch.cat([memory, band])).chunk(2, dim=-1)
            q = block.q(band)
            read = torch.zeros_like(band)
            for i in range(n):
                visible = k_slots + (i + 1 if block.causal else n)
                for h in range(heads):
                    sl = slice(h * d, (h + 1) * d)
                    read[i, sl] = _softmax_attend(
                        q[i : i + 1, sl], k[:visible, sl], v[:visible, sl], d**-0.5
                    )[0]
            outputs = band + block.proj(read)
            for r, i in enumerate(rows):
                out[b, :, i, :] = outputs[r * x.shape[3] : (r + 1) * x.shape[3]].T
            new_memory = torch.empty_like(memory)
            for j in range(k_slots):  # slot j attends to itself and the band outputs only
                m = memory[j : j + 1]
                keys = torch.cat([block.write_k(m), block.write_k(outputs)])
                values = torch.cat([m, block.write_v(outputs)])
                qj = block.write_q(m)
                written = torch.zeros(C, dtype=x.dtype)
                for h in range(heads):
                    sl = slice(h * d, (h + 1) * d)
                    scale = 1.0 / (block.write_temperature * math.sqrt(d))
                    written[sl] = _softmax_attend(qj[:, sl], keys[:, sl], values[:, sl], scale)[0]
                new_memory[j] = bmn(written + block.forget_bias[j])
            memory = new_memory
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kwargs", [{"band_rows": 2}, {"band_rows": 3, "write_temperature": 1.0}])
def test_matches_per_slot_reference(causal, kwargs):
    block = build("memformer", C, causal=causal, heads=2, num_slots=5, **kwargs).double().eval()
    x = feature_map(2, C, 8, 5).double()
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference(block, x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_terminal_state_is_a_fixed_point_when_nothing_is_written(causal):
    """With one head and v(H) = 0 a slot is rewritten as a positive multiple of itself plus v_bias; starting
    from the terminal state s·v_bias/||v_bias|| it stays there exactly, so every band reads the same memory
    and the block equals independent per-band attention over [terminal state; band]."""
    block = build("memformer", C, causal=causal, heads=1, num_slots=4).double().eval()
    with torch.no_grad():
        block.write_v.weight.zero_()
        block.write_v.bias.zero_()
    x = feature_map(1, C, 9, 4).double()
    terminal = block.terminal_state()
    with torch.no_grad():
        state = block.init_state(1, 4, dtype=torch.float64)
        outs = []
        for band in split_bands(x, block.band_rows):
            out, state = block.step(band, state)
            torch.testing.assert_close(state["memory"][0], terminal, atol=1e-12, rtol=1e-12)
            fresh = block.init_state(1, 4, dtype=torch.float64)
            torch.testing.assert_close(out, block.step(band, fresh)[0], atol=1e-12, rtol=1e-12)
            outs.append(out)
        torch.testing.assert_close(torch.cat(outs, dim=2), block(x), atol=1e-12, rtol=1e-12)


def test_forgetting_converges_to_the_terminal_state():
    """Biased memory normalization: with nothing written, any memory drifts monotonically to the terminal
    state (cosine similarity per slot increases towards 1)."""
    block = build("memformer", C, heads=2, num_slots=6).double().eval()
    with torch.no_grad():
        block.write_v.weight.zero_()
        block.write_v.bias.zero_()
        block.write_q.weight.zero_()  # uniform write weights: every head keeps half of the old slot
        block.write_q.bias.zero_()
        block.forget_bias.mul_(0.1)  # a small v_bias forgets slowly; the terminal state is its direction
    terminal = block.terminal_state()
    g = torch.Generator().manual_seed(4)
    state = {"memory": block._normalize(torch.randn(1, 6, C, generator=g, dtype=torch.float64))}
    band = feature_map(1, C, 1, 1).double()
    sims = []
    with torch.no_grad():
        for _ in range(60):
            _, state = block.step(band, state)
            sims.append(torch.cosine_similarity(state["memory"][0], terminal, dim=-1))
    sims = torch.stack(sims)
    assert (sims[1:] >= sims[:-1] - 1e-12).all()
    assert sims[0].min() < 0.9 and sims[-1].min() > 0.999


def test_writing_is_slot_wise():
    """Given the band outputs, slot i's new content depends on slot i only, never on another slot."""
    block = build("memformer", C, heads=2, num_slots=5).double().eval()
    outputs = feature_map(1, C, 2, 4).double().flatten(2).transpose(1, 2)
    memory = block.init_state(1, 4, dtype=torch.float64)["memory"]
    other = memory.clone()
    other[0, 3] = block._normalize(torch.randn(C, dtype=torch.float64))
    with torch.no_grad():
        a, b = block._write(memory, outputs), block._write(other, outputs)
    keep = [0, 1, 2, 4]
    torch.testing.assert_close(a[0, keep], b[0, keep], atol=0, rtol=0)
    assert not torch.allclose(a[0, 3], b[0, 3])


@pytest.mark.parametrize("causal", [False, True])
def test_streaming_equals_one_shot_with_bounded_state(causal):
    block = build("memformer", C, causal=causal, heads=2).eval()
    x = feature_map(2, C, 23, 7)
    with torch.no_grad():
        ref = block(x)
        state = block.init_state(2, 7)
        outs, shapes = [], set()
        for band in split_bands(x, block.band_rows):
            out, state = block.step(band, state)
            outs.append(out)
            shapes.add(tuple(state["memory"].shape))
        torch.testing.assert_close(torch.cat(outs, dim=2), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            torch.cat(list(stream(block, split_bands(x, 2))), dim=2), ref, atol=1e-5, rtol=1e-5
        )
    assert shapes == {(2, 64, C)}


@pytest.mark.parametrize("causal", [False, True])
def test_rows_below_never_change_rows_above_and_memory_carries_far(causal):
    block = build("memformer", C, causal=causal).eval()
    x = feature_map(1, C, 12, 6)
    y = x.clone()
    y[:, :, 8:] = feature_map(1, C, 4, 6, seed=3)
    z = x.clone()
    z[:, :, :2] += 3.0
    with torch.no_grad():
        a, b, c = block(x), block(y), block(z)
    torch.testing.assert_close(a[:, :, :8], b[:, :, :8], atol=0, rtol=0)
    assert not torch.allclose(a[:, :, 8:], b[:, :, 8:])
    assert not torch.allclose(a[:, :, 10:], c[:, :, 10:]), "the first band must reach the last through memory"


def test_bad_arguments():
    import visattn

    for kwargs in ({"num_slots": 0}, {"band_rows": 0}, {"write_temperature": 0.0}, {"heads": 3}):
        with pytest.raises(ValueError, match="^memformer: "):
            visattn.create_attn("memformer", C, **kwargs)
    block = build("memformer", C).eval()
    with pytest.raises(ValueError, match="band_rows=2"):
        block.step(feature_map(1, C, 3, 6), block.init_state(1, 6))
    with pytest.raises(ValueError, match="init_state"):
        block.step(feature_map(1, C, 2, 6), {"memory": torch.zeros(1, 3, C)})


def _forward_and_grads(block, x, forward):
    """Output and the gradients of a fixed weighted sum w.r.t. x and every parameter."""
    x = x.clone().requires_grad_(True)
    out = forward(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad((out * weights).sum(), [x, *block.parameters()], allow_unused=True)
    return out, grads


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({"num_slots": 5}, (8, 5)),
        ({"num_slots": 3, "band_rows": 3, "write_temperature": 1.0}, (11, 5)),
        ({"num_slots": 7, "band_rows": 1}, (5, 3)),
        ({"band_rows": 4, "num_slots": 2}, (13, 3)),
        ({}, (9, 7)),
        ({}, (1, 1)),
    ],
)
def test_hoisted_forward_equals_the_band_loop(dtype, tol, causal, kwargs, size):
    """The one-shot forward (projections hoisted out of the band loop) against the loop of step(): outputs
    and the gradients of input and parameters, at odd sizes and short last bands. A parameter only the
    write uses has no gradient in the loop when there is one band (its last write is unused), and none or
    an exact zero in the forward (some of its weights are fused with the read's)."""
    block = build("memformer", C, causal=causal, heads=2, **kwargs).to(dtype).train()
    x = feature_map(2, C, *size).to(dtype)
    out, grads = _forward_and_grads(block, x, block._forward)
    ref_out, ref_grads = _forward_and_grads(block, x, block._reference_forward)
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    names = ["x"] + [name for name, _ in block.named_parameters()]
    for name, g, ref in zip(names, grads, ref_grads):
        if ref is None:
            assert size[0] <= block.band_rows and name.startswith("write_") and (g is None or not g.any()), (
                name
            )
        else:
            torch.testing.assert_close(g, ref, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


def test_band_projections_run_once_per_forward():
    """The queries and keys/values of the bands are projected for the whole map at once (the loop of step
    projects them band by band); only the slots' and the outputs' projections stay in the loop."""
    block = build("memformer", C, heads=2).eval()
    calls = {"q": 0, "kv": 0}
    for name in calls:
        getattr(block, name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    with torch.no_grad():
        block(feature_map(1, C, 9, 4))
        assert calls == {"q": 1, "kv": 1}
        block._reference_forward(feature_map(1, C, 9, 4))
    assert calls == {"q": 1 + 5, "kv": 1 + 5}
