"""ViT mixers of the memory family (issue 17): ``compressive`` and ``memformer``
(:mod:`visattn.layers.mixers.memory`): the patch grid's row-bands are the segments.

Each core is checked against a naive reference written here from the methods' definitions (explicit loops
over samples, heads, bands, queries and slots, fp64), prefix rule included: prefix queries attend every
token, every patch query has the prefix keys in its one softmax.

Dense limit (logits of the tiny ViT of tests/test_vit.py equal timm's dense ViT to <= 1e-5 at 14 x 14 and
10 x 6 patches):

- compressive: ``band_rows >= H`` (here ``band_rows=14``): one band, no memory.
- memformer: none: even one band covering the grid reads the initial memory slots.

New parameters (keys under ``blocks.i.attn.core``):

- compressive: ``compress.weight`` (2C, C, 1, c) and ``compress.bias`` (2C): a grouped strided conv on the
  keys and on the values; initialised as mean pooling over c tokens (each tap I / c, bias 0).
- memformer: ``forget_bias`` (heads, slots, 2, head_dim), standard normal, and ``write_query``
  (heads, head_dim, head_dim), uniform in +-1/sqrt(head_dim) (the CNN block's initialisation).
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from vit_helpers import NAME, TINY, build_vit

from visattn.layers.mixers import CompressiveCore, MemformerCore
from visattn.models.vit import MIXERS, ViTMixer, mixer_class

GRID, PREFIX = (5, 7), 2


def _qkv(batch=2, heads=2, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = PREFIX + GRID[0] * GRID[1]
    return [
        (torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
        for _ in range(3)
    ]


def _softmax_read(query, keys, values):
    """Explicit softmax attention of one query vector over lists of key and value vectors."""
    logits = torch.stack([query @ key for key in keys]) / math.sqrt(query.shape[0])
    weights = logits.softmax(0)
    return sum(w * val for w, val in zip(weights, values))


def _prefix_dense(q, k, v, bi, hh, out):
    for p in range(PREFIX):
        out[bi][hh][p] = _softmax_read(q[bi, hh, p], list(k[bi, hh]), list(v[bi, hh]))


def _stack(out):
    return torch.stack([torch.stack([torch.stack(row) for row in per_head]) for per_head in out])


def naive_compressive(q, k, v, b, m, cm, c, weight, bias):
    """Band of row r: top row T = (r // b)·b; keys = prefix, the compression of each row in
    [T - m - cm, T - m) (token j of a row = bias + sum over taps of W_tap · feature at column j·c + tap,
    columns past W are zeros), the raw rows [T - m, T) and the band's rows [T, T + b); rows outside the
    grid do not exist. Features concatenate the heads (channel = head·d + i), keys and values separately."""
    bsz, heads, n, d = q.shape
    height, width = GRID
    dim = heads * d
    out = [[[None] * n for _ in range(heads)] for _ in range(bsz)]

    def feat(t, bi, r, x):
        return t[bi, :, PREFIX + r * width + x].reshape(dim)

    def compressed(bi, r, j):
        kc, vc = bias[:dim], bias[dim:]
        for tap in range(c):
            if j * c + tap < width:
                kc = kc + weight[:dim, :, 0, tap] @ feat(k, bi, r, j * c + tap)
                vc = vc + weight[dim:, :, 0, tap] @ feat(v, bi, r, j * c + tap)
        return kc, vc

    for bi in range(bsz):
        for hh in range(heads):
            _prefix_dense(q, k, v, bi, hh, out)
        for r in range(height):
            top = (r // b) * b
            keys = [(k[bi, :, p].reshape(dim), v[bi, :, p].reshape(dim)) for p in range(PREFIX)]
            for rr in range(max(top - m - cm, 0), max(top - m, 0)):
                keys += [compressed(bi, rr, j) for j in range(-(-width // c))]
            for rr in range(max(top - m, 0), min(top + b, height)):
                keys += [(feat(k, bi, rr, x), feat(v, bi, rr, x)) for x in range(width)]
            for x in range(width):
                for hh in range(heads):
                    head = slice(hh * d, hh * d + d)
                    out[bi][hh][PREFIX + r * width + x] = _softmax_read(
                        q[bi, hh, PREFIX + r * width + x],
                        [kk[head] for kk, _ in keys],
                        [vv[head] for _, vv in keys],
                    )
    return _stack(out)


def naive_memformer(q, k, v, b, tau, forget_bias, write_query):
    """Per sample and head: slots start at the terminal state √d·b_i/||b_i|| (key and value parts); band t's
    patch queries read [prefix; slots; band]; then each slot i attends to itself and the band's tokens with
    query κ_i·W, keys [κ_i; k_j], values [(κ_i, ν_i); (k_j, v_j)] at temperature τ, and is renormalised
    with its bias, part by part."""
    bsz, heads, n, d = q.shape
    height, width = GRID
    slots = forget_bias.shape[1]
    out = [[[None] * n for _ in range(heads)] for _ in range(bsz)]
    bands = [range(top, min(top + b, height)) for top in range(0, height, b)]
    for bi in range(bsz):
        for hh in range(heads):
            _prefix_dense(q, k, v, bi, hh, out)

            def renorm(part, i, which, hh=hh):
                shifted = part + forget_bias[hh, i, which]
                return math.sqrt(d) * shifted / shifted.norm()

            mem_k = [renorm(torch.zeros(d, dtype=q.dtype), i, 0) for i in range(slots)]
            mem_v = [renorm(torch.zeros(d, dtype=q.dtype), i, 1) for i in range(slots)]
            for t, rows in enumerate(bands):
                idx = [PREFIX + r * width + x for r in rows for x in range(width)]
                keys = [k[bi, hh, p] for p in range(PREFIX)] + mem_k + [k[bi, hh, j] for j in idx]
                vals = [v[bi, hh, p] for p in range(PREFIX)] + mem_v + [v[bi, hh, j] for j in idx]
                for j in idx:
                    out[bi][hh][j] = _softmax_read(q[bi, hh, j], keys, vals)
                if t == len(bands) - 1:
                    break
                new_k, new_v = [], []
                for i in range(slots):
                    query = mem_k[i] @ write_query[hh]
                    cand_k = [mem_k[i]] + [k[bi, hh, j] for j in idx]
                    cand_v = [torch.cat([mem_k[i], mem_v[i]])] + [
                        torch.cat([k[bi, hh, j], v[bi, hh, j]]) for j in idx
                    ]
                    logits = torch.stack([query @ ck for ck in cand_k]) / (tau * math.sqrt(d))
                    written = sum(w * cv for w, cv in zip(logits.softmax(0), cand_v))
                    new_k.append(renorm(written[:d], i, 0))
                    new_v.append(renorm(written[d:], i, 1))
                mem_k, mem_v = new_k, new_v
    return _stack(out)


def _check_against(core, naive, params):
    q, k, v = _qkv()
    out = core(q, k, v, GRID, PREFIX)
    ref = naive(q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    grads = torch.autograd.grad((out * g).sum(), [q, k, v, *params])
    grads_ref = torch.autograd.grad((ref * g).sum(), [q, k, v, *params])
    for name, a, e in zip(["q", "k", "v"] + [f"param{i}" for i in range(len(params))], grads, grads_ref):
        assert e.abs().max() > 0, name  # every input matters
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize(
    "setting",
    [
        dict(band_rows=2, mem_rows=1, cmem_rows=2),
        dict(band_rows=1),
        dict(band_rows=2, mem_rows=0, cmem_rows=1),
    ],
)
def test_compressive_equals_naive_reference(setting):
    torch.manual_seed(0)
    core = CompressiveCore(6, 2, **setting).double()
    with torch.no_grad():  # not the mean-pooling init: every tap and channel must be right
        core.compress.weight.normal_()
        core.compress.bias.normal_()
    b, m, cm, c = core.band_rows, core.mem_rows, core.cmem_rows, core.compression
    assert (b, c) == (setting["band_rows"], 3) and (m, cm) == (
        setting.get("mem_rows", b),
        setting.get("cmem_rows", 3 * b),
    )
    w, bias = core.compress.weight, core.compress.bias
    _check_against(core, lambda q, k, v: naive_compressive(q, k, v, b, m, cm, c, w, bias), [w, bias])


def test_memformer_equals_naive_reference():
    torch.manual_seed(0)
    core = MemformerCore(6, 2, num_slots=3, band_rows=2, write_temperature=0.5).double()
    fb, wq = core.forget_bias, core.write_query
    _check_against(core, lambda q, k, v: naive_memformer(q, k, v, 2, 0.5, fb, wq), [fb, wq])


def test_compressive_dense_limit_equals_timm_dense(tiny_file, dense, images):
    assert MIXERS["compressive"].dense_limit.startswith("band_rows >= H")
    model = build_vit("compressive", tiny_file, band_rows=14)
    near = build_vit("compressive", tiny_file, band_rows=13)
    with torch.no_grad():
        for key, x in images.items():
            err = (model(x) - dense(x)).abs().max().item()
            assert err <= 1e-5, (key, err)
        # One band short of the grid (14 rows at 224): the second band reads compressed memory only.
        assert (near(images["224"]) - dense(images["224"])).abs().max().item() > 1e-3


def test_memformer_has_no_dense_limit(tiny_file, dense, images):
    assert MIXERS["memformer"].dense_limit is None
    model = build_vit("memformer", tiny_file, band_rows=14)
    with torch.no_grad():
        assert (model(images["224"]) - dense(images["224"])).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "attn, keys",
    [
        ("compressive", {"compress.weight": (64, 32, 1, 3), "compress.bias": (64,)}),
        ("memformer", {"forget_bias": (2, 64, 2, 16), "write_query": (2, 16, 16)}),
    ],
)
def test_new_parameters_keys_init_and_gradients(attn, keys, tiny_file, dense, images):
    model = build_vit(attn, tiny_file)
    new = {k: v for k, v in model.state_dict().items() if k not in dense.state_dict()}
    expected = {f"blocks.{i}.attn.core.{k}": shape for i in range(2) for k, shape in keys.items()}
    assert {k: tuple(v.shape) for k, v in new.items()} == expected
    core = model.blocks[0].attn.core
    if attn == "compressive":
        # Mean pooling over 3 tokens, keys and values alike (not timm's or PyTorch's init).
        pool = (torch.eye(32) / 3)[:, :, None, None].repeat(2, 1, 1, 3)
        torch.testing.assert_close(core.compress.weight, pool, rtol=0, atol=0)
        assert core.compress.bias.abs().max() == 0
    else:
        fb, wq = core.forget_bias, core.write_query
        assert abs(fb.mean().item()) < 0.05 and abs(fb.std().item() - 1) < 0.05  # 4096 N(0, 1) draws
        assert wq.abs().max().item() <= 0.25 and abs(wq.std().item() - 0.25 / math.sqrt(3)) < 0.015
    model.train()
    model.zero_grad()
    # Every token's features (the class-token logits do not read the last block's patch outputs).
    model.forward_features(images["160x96"]).square().mean().backward()
    for i in range(2):
        for k in keys:
            grad = model.get_parameter(f"blocks.{i}.attn.core.{k}").grad
            assert grad is not None and grad.abs().max() > 0, (i, k)


@pytest.mark.parametrize("attn", ["compressive", "memformer"])
def test_batch_independence(attn):
    torch.manual_seed(0)
    core = MIXERS[attn].core(6, 2, **({"num_slots": 3} if attn == "memformer" else {})).double().eval()
    q, k, v = (t.detach() for t in _qkv(batch=3))
    out = core(q, k, v, GRID, PREFIX)
    alone = core(q[1:2], k[1:2], v[1:2], GRID, PREFIX)
    torch.testing.assert_close(out[1:2], alone, rtol=0, atol=1e-12)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[[0, 2]] = torch.randn_like(t[[0, 2]])
    torch.testing.assert_close(core(q2, k2, v2, GRID, PREFIX)[1], out[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "attn, kwargs, match",
    [
        ("compressive", {"band_rows": 0}, r"compressive: band_rows must be an int >= 1, got 0"),
        ("compressive", {"compression": 0}, r"compressive: compression must be an int >= 1"),
        ("compressive", {"mem_rows": -1}, r"compressive: mem_rows must be an int >= 0"),
        ("compressive", {"band_rows": 2.5}, r"compressive: band_rows must be int"),
        ("memformer", {"num_slots": 0}, r"memformer: num_slots must be a positive int, got 0"),
        ("memformer", {"write_temperature": 2.0}, r"memformer: write_temperature must be in \(0, 1\]"),
        ("memformer", {"slots": 4}, r"memformer as a ViT attention does not take \['slots'\]; it accepts"),
    ],
)
def test_bad_hyperparameters(attn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mixer_class(attn, **kwargs)


def test_mixers_are_in_the_vit():
    model = timm.create_model(NAME, attn_layer=mixer_class("memformer", num_slots=4), **TINY)
    assert all(isinstance(b.attn, ViTMixer) and isinstance(b.attn.core, MemformerCore) for b in model.blocks)


def test_compressive_error_to_dense_shrinks_with_band_rows(tiny_file, dense, images):
    """Fewer, taller bands (7, 4, 2 bands on 14 rows, default memories) see more of the grid: closer to dense
    attention. (Not monotone in band_rows itself: a short last band sees little, e.g. 3 rows = 5 bands.)"""
    with torch.no_grad():
        ref = dense(images["224"])
        errs = [
            (build_vit("compressive", tiny_file, band_rows=b)(images["224"]) - ref)
            .square()
            .mean()
            .sqrt()
            .item()
            for b in (2, 4, 7)
        ]
    assert errs[0] > errs[1] > errs[2] > 0, errs
