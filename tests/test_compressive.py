"""Compressive Transformer block: a row-by-row reference, exact limits, streaming, bounded state, aux loss."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map

from visattn.layers.streaming import split_bands, stream

C = 16


def _attend(q, k, v, heads, allowed):
    """softmax(q kᵀ/√d) v per head with an (n, L) boolean mask, by explicit loops (float64)."""
    d = q.shape[1] // heads
    out = torch.zeros_like(q)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        scores = q[:, sl] @ k[:, sl].T / math.sqrt(d)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, sl] = scores.softmax(-1) @ v[:, sl]
    return out


def _compress_row(block, row):
    """The strided 1 x c conv on one (C, W) row, written as sums over each group of c pixels."""
    c = block.compression
    w_pad = -(-row.shape[1] // c) * c
    padded = torch.zeros(row.shape[0], w_pad, dtype=row.dtype)
    padded[:, : row.shape[1]] = row
    weight, bias = block.compress.weight[:, :, 0, :], block.compress.bias
    cols = [bias + sum(weight[:, :, t] @ padded[:, j * c + t] for t in range(c)) for j in range(w_pad // c)]
    return torch.stack(cols, dim=1)


def reference(block, x):
    """Process rows band by band with Python lists as the memories (evicting and compressing row by row)."""
    out = torch.empty_like(x)
    b_rows, heads = block.band_rows, block.heads
    wq, wkv, wo = block.q, block.kv, block.proj
    for b in range(x.shape[0]):
        mem, cmem = [], []  # lists of (C, W) and (C, ceil(W/c)) rows, oldest first
        for top in range(0, x.shape[2], b_rows):
            rows = [x[b, :, i, :] for i in range(top, min(top + b_rows, x.shape[2]))]
            band = torch.cat([r.T for r in rows])  # raster-order tokens (n, C)
            past = [r.T for r in cmem] + [r.T for r in mem]
            ctx = torch.cat(past + [band])
            n, n_past = band.shape[0], ctx.shape[0] - band.shape[0]
            allowed = torch.ones(n, ctx.shape[0], dtype=torch.bool)
            if block.causal:
                for i in range(n):
                    allowed[i, n_past + i + 1 :] = False
            k, v = wkv(ctx).chunk(2, dim=-1)
            res = band + wo(_attend(wq(band), k, v, heads, allowed))
            for r, i in enumerate(range(top, top + len(rows))):
                out[b, :, i, :] = res[r * x.shape[3] : (r + 1) * x.shape[3]].T
            for row in rows:
                mem.append(row)
                if len(mem) > block.mem_rows:
                    evicted = mem.pop(0)
                    if block.cmem_rows:
                        cmem.append(_compress_row(block, evicted))
                        cmem = cmem[-block.cmem_rows :]
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"band_rows": 3, "mem_rows": 1, "cmem_rows": 4}, {"mem_rows": 0}])
def test_matches_row_by_row_reference(causal, kwargs):
    block = build("compressive", C, causal=causal, heads=2, **kwargs).double().eval()
    x = feature_map(2, C, 11, 5).double()
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference(block, x), atol=1e-10, rtol=1e-10)


def _dense(block, x, causal):
    tokens = x[0].flatten(1).T
    n = tokens.shape[0]
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    k, v = block.kv(tokens).chunk(2, dim=-1)
    out = tokens + block.proj(_attend(block.q(tokens), k, v, block.heads, allowed))
    return out.T.reshape(x.shape)


@pytest.mark.parametrize("causal", [False, True])
def test_single_band_equals_plain_self_attention(causal):
    block = build("compressive", C, causal=causal, band_rows=4, heads=2).double().eval()
    x = feature_map(1, C, 4, 6).double()
    with torch.no_grad():
        torch.testing.assert_close(block(x), _dense(block, x, causal), atol=1e-10, rtol=1e-10)


def test_lossless_compression_with_unbounded_memory_equals_dense_causal_attention():
    """Rate 1 with an identity conv and room for every past row: each band sees all rows above it, so
    the causal block is exactly dense causal self-attention over the whole map."""
    block = build("compressive", C, causal=True, band_rows=2, cmem_rows=16, compression=1, heads=2).double()
    with torch.no_grad():
        block.compress.weight.copy_(torch.eye(C, dtype=torch.float64)[:, :, None, None])
        block.compress.bias.zero_()
    x = feature_map(1, C, 9, 5).double()
    with torch.no_grad():
        torch.testing.assert_close(block.eval()(x), _dense(block, x, True), atol=1e-10, rtol=1e-10)
    block.train()(x)
    assert block.aux_loss.item() <= 1e-20, "lossless compression must have zero reconstruction loss"


@pytest.mark.parametrize("causal", [False, True])
def test_streaming_equals_one_shot_with_bounded_state(causal):
    block = build("compressive", C, causal=causal, heads=2).eval()
    x = feature_map(2, C, 23, 7)
    with torch.no_grad():
        ref = block(x)
        state = block.init_state(2, 7)
        outs, shapes = [], []
        for band in split_bands(x, block.band_rows):
            out, state = block.step(band, state)
            outs.append(out)
            shapes.append((tuple(state["mem"].shape), tuple(state["cmem_kv"].shape)))
        torch.testing.assert_close(torch.cat(outs, dim=2), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            torch.cat(list(stream(block, split_bands(x, 2))), dim=2), ref, atol=1e-5, rtol=1e-5
        )
    # Memory fills up to mem_rows / cmem_rows rows and then stays that size, however tall the image.
    assert max(s[0][2] for s in shapes) == block.mem_rows == 2
    assert max(s[1][2] for s in shapes) == block.cmem_rows == 6
    assert len(set(shapes[4:])) == 1


@pytest.mark.parametrize("causal", [False, True])
def test_rows_below_never_change_rows_above(causal):
    block = build("compressive", C, causal=causal).eval()
    x = feature_map(1, C, 9, 6)
    y = x.clone()
    y[:, :, 6:] = feature_map(1, C, 3, 6, seed=3)
    with torch.no_grad():
        a, b = block(x), block(y)
    torch.testing.assert_close(a[:, :, :6], b[:, :, :6], atol=0, rtol=0)
    assert not torch.allclose(a[:, :, 6:], b[:, :, 6:])


def test_far_rows_are_only_seen_through_the_compressed_memory():
    """Band t (rows 2t, 2t+1) sees memory rows 2t-2, 2t-1 and compressed rows 2t-8 .. 2t-3: rows 0-1 reach
    rows 8-9 (band 4) through the compressed memory only, and are forgotten from band 5 on."""
    block = build("compressive", C, causal=True).eval()
    x = feature_map(1, C, 14, 6)
    y = x.clone()
    y[:, :, :2] += 5.0
    with torch.no_grad():
        a, b = block(x), block(y)
    torch.testing.assert_close(a[:, :, 10:], b[:, :, 10:], atol=0, rtol=0)
    assert not torch.allclose(a[:, :, 8:10], b[:, :, 8:10])


def test_reconstruction_loss_trains_only_the_compression():
    block = build("compressive", C).train()
    block(feature_map(2, C, 9, 7))
    loss = block.aux_loss
    assert loss is not None and loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    for name, p in block.named_parameters():
        assert (p.grad is not None) == name.startswith("compress."), name
    block.eval()(feature_map(1, C, 9, 7))
    assert block.aux_loss is None


def test_bad_arguments():
    import visattn

    for kwargs in ({"band_rows": 0}, {"compression": 0}, {"mem_rows": -1}, {"heads": 3}):
        with pytest.raises(ValueError, match="^compressive: "):
            visattn.create_attn("compressive", C, **kwargs)
    block = build("compressive", C).eval()
    with pytest.raises(ValueError, match="band_rows=2"):
        block.step(feature_map(1, C, 3, 6), block.init_state(1, 6))
    with pytest.raises(ValueError, match="init_state"):
        block.step(feature_map(1, C, 2, 6), block.init_state(1, 5))
    with pytest.raises(ValueError, match="batch"):
        block.step(feature_map(1, C, 2, 6), block.init_state(2, 6))


def _forward_and_grads(block, x, forward):
    """Output, aux loss and the gradients of a fixed weighted sum (plus the aux loss) w.r.t. x and every
    parameter (None where the parameter is not used)."""
    x = x.clone().requires_grad_(True)
    out = forward(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * weights).sum() + (3 * block.aux_loss if block.aux_loss is not None else 0)
    grads = torch.autograd.grad(loss, [x, *block.parameters()], allow_unused=True)
    return out, block.aux_loss, grads


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({}, (11, 5)),
        ({"band_rows": 3, "mem_rows": 1, "cmem_rows": 4}, (11, 5)),
        ({"band_rows": 2, "mem_rows": 3, "cmem_rows": 2, "compression": 2}, (9, 7)),
        ({"mem_rows": 0}, (7, 6)),
        ({"cmem_rows": 0}, (5, 3)),
        ({"band_rows": 4, "mem_rows": 5}, (13, 3)),
        ({}, (3, 4)),
        ({}, (1, 1)),
    ],
)
def test_batched_forward_equals_the_band_loop(dtype, tol, causal, train, kwargs, size):
    """The one-shot forward (all bands in one SDPA) against the band loop of step(): outputs, aux loss and
    the gradients of input and parameters, at odd sizes, short last bands and maps shorter than the memory."""
    block = build("compressive", C, causal=causal, heads=2, **kwargs).to(dtype).train(train)
    x = feature_map(2, C, *size).to(dtype)
    out, aux, grads = _forward_and_grads(block, x, block._forward)
    ref_out, ref_aux, ref_grads = _forward_and_grads(block, x, block._reference_forward)
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    assert (
        (aux is None) == (ref_aux is None) == (not train or size[0] <= block.mem_rows or not block.cmem_rows)
    )
    if aux is not None:
        torch.testing.assert_close(aux, ref_aux, atol=tol, rtol=tol)
    names = ["x"] + [name for name, _ in block.named_parameters()]
    for name, g, ref in zip(names, grads, ref_grads):
        assert (g is None) == (ref is None), name
        if g is not None:
            torch.testing.assert_close(g, ref, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


def test_forward_attends_all_bands_in_one_sdpa(monkeypatch):
    """No loop over bands: one SDPA for the map (three in training: the reconstruction loss adds two),
    however many bands; the band loop (step) makes one per band."""
    import torch.nn.functional as F

    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    block = build("compressive", C, heads=2)
    x = feature_map(1, C, 15, 4)
    with torch.no_grad():
        block.eval()(x)
        assert len(calls) == 1
        block.train()(x)
        assert len(calls) == 1 + 3
        block._reference_forward(x)
    assert len(calls) == 4 + 8 + 2 * 7  # one per band, two more per band that evicts rows (training)
