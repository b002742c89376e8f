import pytest
import torch
import torch.nn.functional as F
from helpers import build, feature_map

import visattn
from visattn.attn.talk import box_sum, summed_area_table


def naive_box_sum(v, y0, y1, x0, x1):
    """Explicit weighted sum: pixel (k, m) weighs its overlap with the box [y0, y1) x [x0, x1)."""
    g, c, h, w = v.shape
    out = torch.zeros(g, c, h, w, dtype=v.dtype)
    ks = torch.arange(h, dtype=v.dtype)
    ms = torch.arange(w, dtype=v.dtype)
    for b in range(g):
        for i in range(h):
            for j in range(w):
                wr = (torch.minimum(y1[b, i, j], ks + 1) - torch.maximum(y0[b, i, j], ks)).clamp(min=0)
                wc = (torch.minimum(x1[b, i, j], ms + 1) - torch.maximum(x0[b, i, j], ms)).clamp(min=0)
                out[b, :, i, j] = (v[b] * wr[:, None] * wc[None, :]).sum((-2, -1))
    return out


def random_edges(g, h, w, *, integer=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ys = torch.rand(g, h, w, 2, generator=gen, dtype=torch.float64) * h
    xs = torch.rand(g, h, w, 2, generator=gen, dtype=torch.float64) * w
    if integer:
        ys, xs = ys.floor(), xs.floor()
    return ys.min(-1).values, ys.max(-1).values, xs.min(-1).values, xs.max(-1).values


@pytest.mark.parametrize("integer", [True, False])
def test_box_sum_equals_explicit_weighted_sum(integer):
    g, c, h, w = 2, 3, 5, 6
    v = torch.randn(g, c, h, w, dtype=torch.float64)
    y0, y1, x0, x1 = random_edges(g, h, w, integer=integer)
    got = box_sum(summed_area_table(v.permute(0, 2, 3, 1)), y0, y1, x0, x1).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, naive_box_sum(v, y0, y1, x0, x1), atol=1e-10, rtol=1e-10)
    if integer:  # integer edges: a plain slice sum
        b, i, j = 1, 3, 2
        t, bt, lft, rt = (int(e[b, i, j]) for e in (y0, y1, x0, x1))
        torch.testing.assert_close(got[b, :, i, j], v[b, :, t:bt, lft:rt].sum((-2, -1)))


def test_box_sum_gradients_match_finite_differences():
    g, c, h, w = 1, 2, 4, 5
    v = torch.randn(g, h, w, c, dtype=torch.float64, requires_grad=True)
    # Fractional edges away from integers: the interpolation is differentiable there.
    edges = [e.floor() + 0.25 + 0.5 * torch.rand_like(e) for e in random_edges(g, h, w, seed=3)]
    edges = [e.clamp(max=lim - 0.3).requires_grad_() for e, lim in zip(edges, (h, h, w, w), strict=True)]
    assert torch.autograd.gradcheck(lambda v, *e: box_sum(summed_area_table(v), *e), (v, *edges))


def explicit_block(block, x):
    """The block's output with the box mean written as a naive loop (edges from the paper's formula)."""
    h, w = x.shape[-2:]
    n = block.heads
    v = block.in_proj(x)
    if block.glu:
        v = F.glu(v, dim=1)
    a = torch.sigmoid(block.offsets(v)).double()
    a = a.unflatten(1, (-1, n)).transpose(0, 1).flatten(1, 2)  # (k, B * heads, H, W)
    up, down, left, right = block.max_extent
    i = torch.arange(h, dtype=torch.float64).view(h, 1)
    j = torch.arange(w, dtype=torch.float64).view(1, w)
    if block.causal:
        y0, x0 = (i - a[0] * up).clamp(min=0), (j - a[1] * left).clamp(min=0)
        y1, x1 = (i + 1).expand_as(y0), (j + 1).expand_as(x0)
        max_area = (up + 1) * (left + 1)
    else:
        y0, x0 = (i - a[0] * up).clamp(min=0), (j - a[2] * left).clamp(min=0)
        y1, x1 = (i + a[1] * down).clamp(max=h - 1) + 1, (j + a[3] * right).clamp(max=w - 1) + 1
        max_area = (up + down + 1) * (left + right + 1)
    vh = v.double().unflatten(1, (n, -1)).flatten(0, 1)
    total = naive_box_sum(vh, y0, y1, x0, x1)
    if block.normalize == "area":
        out = total / ((y1 - y0) * (x1 - x0)).unsqueeze(1)
    else:
        out = total / max_area
    out = out.unflatten(0, (-1, n)).flatten(1, 2).float()
    return x + block.proj(out)


def support(grad):
    """Pixels with a non-negligible gradient: the four signed table lookups cancel outside the box
    only up to float rounding (~1e-8), since the interpolation weights sum to zero in floating point."""
    mag = grad[0].abs().sum(0)
    return mag > 1e-5 * mag.max()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("normalize", ["area", "max"])
def test_block_equals_explicit_box_mean(causal, normalize):
    block = build("talk", 32, heads=2, max_extent=(2, 3, 1, 4), normalize=normalize, causal=causal).eval()
    x = feature_map(2, 32, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(block(x), explicit_block(block, x), atol=1e-5, rtol=1e-5)


def test_box_mean_of_a_constant_map_is_the_constant():
    block = build("talk", 32).eval()
    v = torch.full((1, 32, 9, 7), 3.5)
    torch.testing.assert_close(block.talk(v), v)


def test_causal_receptive_field_is_an_up_left_box():
    block = build("talk", 32, max_extent=3, causal=True).eval()
    x = feature_map(1, 32, 6, 7, requires_grad=True)
    i, j = 4, 5
    (grad,) = torch.autograd.grad(block(x)[0, :, i, j].sum(), x)
    reached = support(grad)
    rows, cols = reached.nonzero().unbind(1)
    assert reached[i, j] and reached[i - 1, j - 1], "the box must cover the pixel and its up-left neighbour"
    assert rows.max() == i and cols.max() == j, "nothing below or right of the pixel"
    box = torch.zeros_like(reached)
    box[rows.min() : i + 1, cols.min() : j + 1] = True
    assert torch.equal(reached, box)


def test_non_causal_box_grows_with_max_extent():
    x = feature_map(1, 32, 9, 9, requires_grad=True)
    sizes = []
    for extent in (1, 3):
        block = build("talk", 32, max_extent=extent).eval()
        (grad,) = torch.autograd.grad(block(x)[0, :, 4, 4].sum(), x)
        reached = support(grad)
        rows, cols = reached.nonzero().unbind(1)
        assert rows.min() >= 4 - extent and rows.max() <= 4 + extent
        assert cols.min() >= 4 - extent and cols.max() <= 4 + extent
        sizes.append(int(reached.sum()))
    assert sizes[1] > sizes[0]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_extent": -1}, {"max_extent": (1, 2)}, {"heads": 5}, {"normalize": "sum"}, {"offset_dropout": 1.0}],
)
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^talk: "):
        visattn.create_attn("talk", 32, **kwargs)
