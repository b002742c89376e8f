"""Star-Transformer in 2D: the vectorised cycles against the paper's Algorithm 1 written with explicit
per-pixel loops, per-head softmaxes and only the in-map 3x3 neighbours."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import build, feature_map

import visattn
import visattn.attn.star as star_mod
from visattn.attn.star import neighbourhood_mask
from visattn.layers import sincos_2d

C = 16


def multi_att(att, heads: int, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """MultiAtt(query (C,), context (J, C)) with an explicit softmax per head."""
    d = query.shape[-1] // heads
    q = att.q(query)
    k, v = att.kv(context).chunk(2, dim=-1)
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = k[:, sl] @ q[sl] / math.sqrt(d)
        weights = logits.exp() / logits.exp().sum()
        outs.append(weights @ v[:, sl])
    return att.proj(torch.cat(outs))


def ref_star(block, x: torch.Tensor) -> torch.Tensor:
    b, c, height, width = x.shape
    heads = block.heads
    emb = x.flatten(2).transpose(1, 2) + sincos_2d(height, width, c, dtype=x.dtype)
    sat, relay = emb, emb.mean(1)
    for t in range(block.cycles):
        att, norm = block.satellite_attn[t], block.satellite_norm[t]
        rows = []
        for bi in range(b):
            for i in range(height):
                for j in range(width):
                    context = [
                        sat[bi, ii * width + jj]
                        for ii in (i - 1, i, i + 1)
                        for jj in (j - 1, j, j + 1)
                        if 0 <= ii < height and 0 <= jj < width
                    ]
                    context += [emb[bi, i * width + j], relay[bi]]
                    rows.append(multi_att(att, heads, sat[bi, i * width + j], torch.stack(context)))
        sat = norm(F.relu(torch.stack(rows).reshape(b, height * width, c)))
        if t < block.cycles - 1:
            att, norm = block.relay_attn[t], block.relay_norm[t]
            relay = torch.stack(
                [multi_att(att, heads, relay[bi], torch.cat([relay[bi, None], sat[bi]])) for bi in range(b)]
            )
            relay = norm(F.relu(relay))
    return x + block.proj(sat).transpose(1, 2).reshape(b, c, height, width)


@pytest.mark.parametrize(
    "size,cycles,heads",
    [((1, 1), 2, None), ((3, 4), 1, 2), ((4, 5), 2, None), ((3, 3), 3, 4), ((2, 6), 2, 1)],
)
def test_matches_per_pixel_reference(size, cycles, heads):
    block = build("star", C, cycles=cycles, heads=heads, dtype=torch.float64).eval()
    x = feature_map(2, C, *size).double()
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref_star(block, x), atol=1e-10, rtol=0)


def test_gradients_match_reference():
    block = build("star", C, dtype=torch.float64).train()
    x = feature_map(1, C, 2, 3).double().requires_grad_(True)
    weights = torch.randn(1, C, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    params = [x, *block.parameters()]
    grads = torch.autograd.grad((block(x) * weights).sum(), params)
    ref = torch.autograd.grad((ref_star(block, x) * weights).sum(), params)
    for a, b_ in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b_, atol=1e-10, rtol=0)


def test_float32_matches_float64_reference():
    block = build("star", C).eval()
    x = feature_map(1, C, 3, 4)
    with torch.no_grad():
        ref = ref_star(block.double(), x.double()).float()
        block.float()
        torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


def test_border_positions_are_masked_not_zero_keys(monkeypatch):
    mask = neighbourhood_mask(3, 4)
    assert mask.shape == (12, 11)
    # corner: 4 in-map neighbours, edge: 6, interior: 9; embedding and relay always.
    assert mask.sum(1).tolist() == [6, 8, 8, 6, 8, 11, 11, 8, 6, 8, 8, 6]
    assert mask[:, 9:].all()
    # Attending padded zeros would give a zero key (logit 0) extra weight: outputs would differ.
    block = build("star", C, cycles=1, dtype=torch.float64).eval()
    x = feature_map(1, C, 3, 4).double()
    with torch.no_grad():
        ours = block(x)
        monkeypatch.setattr(
            star_mod, "neighbourhood_mask", lambda h, w, device=None: torch.ones(h * w, 11).bool()
        )
        unmasked = block(x)
    corner = (ours - unmasked)[..., 0, 0].abs().max().item()
    interior = (ours - unmasked)[..., 1, 1].abs().max().item()
    assert corner > 1e-3 and interior < 1e-12, (corner, interior)


def test_relay_carries_global_context():
    """After one cycle a pixel sees its 3x3 neighbourhood and, through s_0 = mean(e), every pixel."""
    block = build("star", C, cycles=1).eval()
    x = feature_map(1, C, 5, 6, requires_grad=True)
    (grad,) = torch.autograd.grad(block(x)[0, :, 0, 0].sum(), x)
    assert (grad[0].abs().sum(0) > 0).all()


def test_defaults_and_bad_hyperparameters():
    block = visattn.create_attn("star", 256)
    assert block.cycles == 2 and block.heads == 8
    assert len(block.relay_attn) == 1
    for kwargs in ({"cycles": 0}, {"heads": 3}, {"heads": 0}, {"cycles": 1.5}):
        with pytest.raises(ValueError, match="^star: "):
            visattn.create_attn("star", C, **kwargs)
