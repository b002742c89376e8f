"""Memory-compressed attention: explicit formula (head-dim scaling), causal visibility of whole cells."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import build, feature_map, raster_jacobian_support

import visattn
from visattn.attn.memory_compressed import cell_last_positions

C, HEADS = 8, 2


def test_cell_last_positions_by_hand():
    # 5x7 map, s = 3: cell rows end at 2 and 4 (clipped), columns at 2, 5 and 6 (clipped).
    assert cell_last_positions(5, 7, 3).tolist() == [16, 19, 20, 30, 33, 34]


def cell_pixels(h: int, w: int, s: int) -> list[list[int]]:
    cells = []
    for ci in range(0, h, s):
        for cj in range(0, w, s):
            cells.append([r * w + c for r in range(ci, min(ci + s, h)) for c in range(cj, min(cj + s, w))])
    return cells


def reference_output(block, x: torch.Tensor, causal: bool) -> torch.Tensor:
    b, c, h, w = x.shape
    s, n, d = block.compression, h * w, c // HEADS
    p = {k: v.double() for k, v in block.state_dict().items()}
    feat = (block.pos(x) if block.pos is not None else x).double()
    cells = cell_pixels(h, w, s)
    y = x.double().clone()
    for bi in range(b):
        t = feat[bi].reshape(c, n).T
        q = t @ p["q.weight"].T + p["q.bias"]
        # Compressed K, V: conv with kernel = stride = s over the zero-padded map, one vector per cell.
        kv = []
        for pix in cells:
            acc = p["kv.bias"].clone()
            r0, c0 = (pix[0] // w), (pix[0] % w)
            for pos in pix:
                acc += p["kv.weight"][:, :, pos // w - r0, pos % w - c0] @ t[pos]
            kv.append(acc)
        kv = torch.stack(kv)
        if causal:
            own = t @ p["kv_self.weight"].T + p["kv_self.bias"]
        out = torch.zeros(n, c, dtype=torch.float64)
        for i in range(n):
            visible = [m for m, pix in enumerate(cells) if not causal or max(pix) <= i]
            for hd in range(HEADS):
                sl, vsl = slice(hd * d, (hd + 1) * d), slice(c + hd * d, c + (hd + 1) * d)
                keys = [kv[m, sl] for m in visible] + ([own[i, sl]] if causal else [])
                vals = [kv[m, vsl] for m in visible] + ([own[i, vsl]] if causal else [])
                logits = torch.stack([q[i, sl] @ k_ for k_ in keys]) / math.sqrt(d)  # head-dim scaling
                out[i, sl] = torch.softmax(logits, 0) @ torch.stack(vals)
        y[bi] += (out @ p["proj.weight"].T + p["proj.bias"]).T.reshape(c, h, w)
    return y


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "hw,kwargs",
    [((6, 9), {}), ((5, 7), {"pos_enc": False}), ((4, 4), {"compression": 2}), ((1, 2), {})],
    ids=["exact", "padded", "s2", "tiny"],
)
def test_matches_formula(causal, hw, kwargs):
    block = build("memory_compressed", C, heads=HEADS, causal=causal, **kwargs).double().eval()
    x = feature_map(2, C, *hw).double()
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference_output(block, x, causal), atol=1e-9, rtol=1e-9)


def test_causal_sees_whole_cells_only_and_itself():
    h, w, s = 5, 7, 3
    block = build("memory_compressed", 16, causal=True, pos_enc=False).double().eval()
    support = raster_jacobian_support(block.float(), 16, h, w)
    cells = cell_pixels(h, w, s)
    for pos in range(h * w):
        expected = {pos} | {q for pix in cells if max(pix) <= pos for q in pix}
        assert set(support[pos].nonzero().flatten().tolist()) == expected, pos


def test_causal_queries_before_any_complete_cell_see_only_themselves():
    block = build("memory_compressed", 16, causal=True, pos_enc=False).eval()
    x = feature_map(1, 16, 3, 3)
    y = x.clone()
    y[:, :, 2, 2] += 5.0  # the last pixel of the only cell; every earlier query must ignore it
    with torch.no_grad():
        a, b = block(x), block(y)
    torch.testing.assert_close(a.flatten(2)[..., :8], b.flatten(2)[..., :8], atol=0, rtol=0)
    assert not torch.allclose(a[..., 2, 2], b[..., 2, 2])


def test_non_causal_has_no_own_key():
    assert visattn.create_attn("memory_compressed", 32).kv_self is None


@pytest.mark.parametrize("kwargs", [{"compression": 0}, {"heads": 3}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^memory_compressed: "):
        visattn.create_attn("memory_compressed", 32, **kwargs)
