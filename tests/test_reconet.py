"""RecoNet (TGM + TRM) against slow explicit references, and its error against the rank budget."""

from __future__ import annotations

import pytest
import torch
from helpers import build, feature_map

import visattn
from visattn.attn.reconet import cp_reconstruct

C = 6


def _explicit_cp(lam, vc, vh, vw):
    """Σ_r λ_r v_c^r ⊗ v_h^r ⊗ v_w^r by loops, one sample."""
    r, c = vc.shape
    h, w = vh.shape[1], vw.shape[1]
    out = torch.zeros(c, h, w, dtype=vc.dtype)
    for k in range(r):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    out[ch, i, j] += lam[k] * vc[k, ch] * vh[k, i] * vw[k, j]
    return out


def test_cp_reconstruct_matches_explicit_sum_of_rank1_tensors():
    g = torch.Generator().manual_seed(0)
    b, r, h, w = 2, 5, 3, 4
    lam = torch.rand(r, generator=g, dtype=torch.float64)
    vc, vh, vw = (torch.rand(b, r, n, generator=g, dtype=torch.float64) for n in (C, h, w))
    out = cp_reconstruct(lam, vc, vh, vw)
    for i in range(b):
        torch.testing.assert_close(out[i], _explicit_cp(lam, vc[i], vh[i], vw[i]), atol=1e-12, rtol=0)


def test_block_matches_explicit_tgm_trm():
    r, h, w = 3, 4, 5
    block = build("reconet", C, rank=r).double().eval()
    x = feature_map(2, C, h, w, seed=2).double()
    with torch.no_grad():
        out = block(x)
    wc, bc = block.channel_gen.weight, block.channel_gen.bias  # (r·C, C)
    wh, bh = block.height_gen.weight[..., 0], block.height_gen.bias  # (r, C)
    ww, bw = block.width_gen.weight[..., 0], block.width_gen.bias
    lam = block.rank_weights
    wp, bp = block.proj.weight[..., 0, 0], block.proj.bias
    for b in range(2):
        xb = x[b]
        gap = torch.stack([xb[ch].sum() / (h * w) for ch in range(C)])
        vc = torch.sigmoid(wc @ gap + bc).reshape(r, C)
        row_means = torch.stack([xb[:, i, :].sum(1) / w for i in range(h)], dim=1)  # (C, H)
        col_means = torch.stack([xb[:, :, j].sum(1) / h for j in range(w)], dim=1)  # (C, W)
        vh = torch.sigmoid(wh @ row_means + bh[:, None])
        vw = torch.sigmoid(ww @ col_means + bw[:, None])
        a = _explicit_cp(lam, vc, vh, vw)
        context = xb * a
        ref = xb + torch.einsum("oc,chw->ohw", wp, context) + bp[:, None, None]
        torch.testing.assert_close(out[b], ref, atol=1e-10, rtol=1e-10)


def test_attention_tensor_starts_as_an_average_of_rank1_tensors():
    """λ_i = 1/r at initialisation: A is a convex combination of sigmoid products, in (0, 1)."""
    block = visattn.create_attn("reconet", C, rank=5)
    a = block.attention_tensor(feature_map(2, C, 4, 5))
    assert 0.0 < a.min() and a.max() < 1.0
    torch.testing.assert_close(block.rank_weights.sum(), torch.tensor(1.0))


def _fit_error(rank: int, target: torch.Tensor, x: torch.Tensor, steps: int = 200) -> float:
    torch.manual_seed(0)
    block = visattn.create_attn("reconet", x.shape[1], rank=rank).double()
    opt = torch.optim.Adam(block.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        loss = (block.attention_tensor(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((block.attention_tensor(x) - target).norm() / target.norm()).item()


def test_reconstruction_error_decreases_with_rank():
    """A full-rank target attention tensor (C x H x W = 4 x 5 x 5, entries in (0.1, 0.9)) is fitted
    by the TGM/TRM of one input: the relative error falls as the CP rank budget r grows."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 5, 5, generator=g, dtype=torch.float64)
    target = 0.1 + 0.8 * torch.rand(1, 4, 5, 5, generator=g, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 200 tiny steps: thread hand-offs would dominate on a shared machine
    try:
        errors = {r: _fit_error(r, target, x) for r in (1, 4, 16)}
    finally:
        torch.set_num_threads(threads)
    assert errors[1] > errors[4] > errors[16], errors
    assert errors[16] < 0.6 * errors[1], errors


@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_invalid_rank(rank):
    with pytest.raises(ValueError, match="^reconet: "):
        visattn.create_attn("reconet", C, rank=rank)


def test_default_rank_is_the_papers():
    assert visattn.create_attn("reconet", 16).rank == 64
