"""ViT mixers that compress the patch keys/values along the token axis (visattn.layers.mixers.compressed,
issue 17): kronecker, linformer, memory_compressed.

- kronecker (KAO_KV): keys/values = prefix keys + the H row means and W column means of the patch k/v grid.
  No new parameters, no dense limit and no budget knob (H + W pooled keys for any grid).
- linformer: patch keys/values projected to k rows by E, F (new parameters ``core.e``, ``core.f``, N(0, 1/k))
  defined on a reference grid and resampled to the patch grid; prefix keys unprojected. No dense limit by
  hyperparameters; with k = H*W, ref_size = (H, W) and E = F = I it is exactly dense (tested on the model).
- memory_compressed: a grouped (per head of k and of v) strided s x s convolution over the patch k/v grid
  (new parameters ``core.kv.weight``, ``core.kv.bias``, initialised as the cell mean); prefix keys kept.
  Dense limit: compression=1 at initialisation (the convolution is the identity).

The naive references below build every key set by explicit loops over tokens, rows, columns and cells, and
run softmax attention one query at a time, in float64.
"""

from __future__ import annotations

import logging

import pytest
import torch
from vit_helpers import NAME, TINY, build_vit

import visattn
from visattn.layers.mixers import KroneckerCore, LinformerCore, MemoryCompressedCore
from visattn.layers.reference_grid import resample_grid
from visattn.models.vit import MIXERS, mixer_class

GRID, PREFIX, HEADS, HEAD_DIM = (5, 7), 2, 2, 4
DIM = HEADS * HEAD_DIM


def _qkv(batch=2, grid=GRID, prefix=PREFIX, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = prefix + grid[0] * grid[1]
    # A scale of 2 makes the softmax peaked, so a wrong key set shows in the outputs.
    return [
        (2 * torch.randn(batch, HEADS, n, HEAD_DIM, generator=g, dtype=torch.float64)).requires_grad_()
        for _ in range(3)
    ]


def _naive_attention(query, keys, values):
    """softmax(query · keys / sqrt(d)) values for one query vector and explicit (M, d) key/value lists."""
    logits = torch.stack([(query * key).sum() for key in keys]) / query.shape[-1] ** 0.5
    weights = torch.exp(logits - logits.max())
    weights = weights / weights.sum()
    return sum(w * value for w, value in zip(weights, values))


def _naive_mixer(q, k, v, prefix, compress):
    """The prefix rule by hand: prefix queries attend every token; patch queries attend the prefix keys and
    ``compress(k[b, h], v[b, h], head)`` -> (compressed keys, compressed values), as lists of vectors."""
    batch, heads, n, _ = q.shape
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            ck, cv = compress(k[b, h, prefix:], v[b, h, prefix:], h)
            keys = [k[b, h, t] for t in range(prefix)] + list(ck)
            values = [v[b, h, t] for t in range(prefix)] + list(cv)
            for t in range(n):
                if t < prefix:
                    out[b, h, t] = _naive_attention(q[b, h, t], k[b, h], v[b, h])
                else:
                    out[b, h, t] = _naive_attention(q[b, h, t], keys, values)
    return out


def _check_against_naive(core, compress, grid=GRID, prefix=PREFIX):
    q, k, v = _qkv(grid=grid, prefix=prefix)
    out = core(q, k, v, grid, prefix)
    ref = _naive_mixer(q, k, v, prefix, compress)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"d/d{name}")
    return out


# ---------------------------------------------------------------- naive references (outputs and gradients)


def _row_col_means(grid):
    height, width = grid

    def compress(kp, vp, head):
        def means(t):
            rows = [sum(t[y * width + x] for x in range(width)) / width for y in range(height)]
            cols = [sum(t[y * width + x] for y in range(height)) / height for x in range(width)]
            return rows + cols

        return means(kp), means(vp)

    return compress


@pytest.mark.parametrize("grid, prefix", [(GRID, PREFIX), ((1, 6), 0), ((4, 1), 1)])
def test_kronecker_equals_naive_row_column_means(grid, prefix):
    core = KroneckerCore(DIM, HEADS).double()
    _check_against_naive(core, _row_col_means(grid), grid, prefix)


def _linformer_compress(e, f, ref_hw, grid):
    n_ref, n = ref_hw[0] * ref_hw[1], grid[0] * grid[1]
    # The CNN block's reference-grid resampling (tested in test_linformer / test_reference_grid), then the
    # length projection by explicit sums over the patch tokens.
    e_res = resample_grid(e, ref_hw, grid) * (n_ref / n)
    f_res = resample_grid(f, ref_hw, grid) * (n_ref / n)

    def compress(kp, vp, head):
        he, hf = e_res[head % e_res.shape[0]], f_res[head % f_res.shape[0]]
        keys = [sum(he[r, t] * kp[t] for t in range(n)) for r in range(he.shape[0])]
        values = [sum(hf[r, t] * vp[t] for t in range(n)) for r in range(hf.shape[0])]
        return keys, values

    return compress


@pytest.mark.parametrize("sharing", ["headwise", "none", "key_value"])
@pytest.mark.parametrize("ref_size", [GRID, (3, 4)])
def test_linformer_equals_naive_projection(sharing, ref_size):
    torch.manual_seed(0)
    core = LinformerCore(DIM, HEADS, k=6, sharing=sharing, ref_size=ref_size).double()
    n_proj = HEADS if sharing == "none" else 1
    assert core.e.shape == (n_proj, 6, ref_size[0] * ref_size[1])
    assert (core.f is None) == (sharing == "key_value")
    f = core.e if core.f is None else core.f
    if ref_size == GRID:  # at the reference grid E and F are used as they are, no resampling
        compress = _linformer_compress(core.e.detach(), f.detach(), GRID, GRID)
        torch.testing.assert_close(core.holder.block.projection(core.e, *GRID), core.e, rtol=0, atol=0)
    else:
        compress = _linformer_compress(core.e.detach(), f.detach(), ref_size, GRID)
    _check_against_naive(core, compress)


def _conv_compress(core, grid, s):
    height, width = grid
    weight, bias = core.kv.weight.detach(), core.kv.bias.detach()
    heads, d = core.heads, core.head_dim

    def compress(kp, vp, head):
        out = []
        for t, group in ((kp, head), (vp, heads + head)):  # conv groups: the key heads, then the value heads
            cells = []
            for a in range(-(-height // s)):
                for b in range(-(-width // s)):
                    cell = bias[group * d : (group + 1) * d].clone()
                    for i in range(s):
                        for j in range(s):
                            y, x = a * s + i, b * s + j
                            if y < height and x < width:  # zero padding at the bottom/right
                                cell = cell + weight[group * d : (group + 1) * d, :, i, j] @ t[y * width + x]
                    cells.append(cell)
            out.append(cells)
        return out[0], out[1]

    return compress


@pytest.mark.parametrize("s", [2, 3])
def test_memory_compressed_equals_naive_strided_conv(s):
    torch.manual_seed(0)
    core = MemoryCompressedCore(DIM, HEADS, compression=s).double()
    with torch.no_grad():  # a random convolution (not the cell-mean init), so every tap and group matters
        core.kv.weight.normal_(0, 0.5)
        core.kv.bias.normal_(0, 0.5)
    _check_against_naive(core, _conv_compress(core, GRID, s))


def test_memory_compressed_init_is_the_cell_mean():
    core = MemoryCompressedCore(DIM, HEADS, compression=3).double()
    core.reset_parameters()  # in float64, so 1/9 is exact to float64 rounding
    grid = (6, 9)  # multiples of 3: no padded cell

    def mean_cells(kp, vp, head):
        def means(t):
            return [
                sum(t[(3 * a + i) * 9 + 3 * b + j] for i in range(3) for j in range(3)) / 9
                for a in range(2)
                for b in range(3)
            ]

        return means(kp), means(vp)

    _check_against_naive(core, mean_cells, grid)


# ---------------------------------------------------------------- dense limits on the model (logits)


def test_memory_compressed_dense_limit_is_compression_1(tiny_file, dense, images):
    assert MIXERS["memory_compressed"].dense_limit.startswith("compression=1 at initialisation")
    model = build_vit("memory_compressed", tiny_file, compression=1)
    approx = build_vit("memory_compressed", tiny_file)
    with torch.no_grad():
        for key, x in images.items():
            ref = dense(x)
            assert (model(x) - ref).abs().max().item() <= 1e-5, key
            assert (approx(x) - ref).abs().max().item() > 1e-3, key  # the default really compresses


def test_linformer_with_identity_projections_is_dense(tiny_file, dense):
    """k = H*W at ref_size = (H, W) with E = F = I: the projected keys are the patch keys."""
    x = torch.randn(2, 3, 80, 112, generator=torch.Generator().manual_seed(2))  # a 5 x 7 patch grid
    model = build_vit("linformer", tiny_file, k=35, ref_size=(5, 7))
    approx = build_vit("linformer", tiny_file, k=35, ref_size=(5, 7))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.core.e.copy_(torch.eye(35))
            block.attn.core.f.copy_(torch.eye(35))
        ref = dense(x)
        assert (model(x) - ref).abs().max().item() <= 1e-5
        assert (approx(x) - ref).abs().max().item() > 1e-3  # the paper's random projections do not


def test_kronecker_has_no_dense_limit(tiny_file, dense, images):
    assert MIXERS["kronecker"].dense_limit is None and MIXERS["linformer"].dense_limit is None
    model = build_vit("kronecker", tiny_file)
    with torch.no_grad():
        x = images["160x96"]
        assert (model(x) - dense(x)).abs().max().item() > 1e-3


# ---------------------------------------------------------------- new parameters: keys, paper init, gradients


def test_new_parameter_keys_init_and_gradients(tiny_file, images, caplog):
    with caplog.at_level(logging.INFO, logger="visattn.models.vit"):
        lin = build_vit("linformer", tiny_file)
        mem = build_vit("memory_compressed", tiny_file)
        kro = build_vit("kronecker", tiny_file)
    log = " ".join(r.getMessage() for r in caplog.records)
    assert "new parameters: blocks.0.attn.core.e, blocks.0.attn.core.f, blocks.1.attn.core.e" in log
    assert "new parameters: blocks.0.attn.core.kv.weight, blocks.0.attn.core.kv.bias" in log
    assert "kronecker attention in 2 layer(s)" in log and not any(".core." in k for k in kro.state_dict())
    new = {k for k in lin.state_dict() if ".core." in k}
    assert new == {f"blocks.{i}.attn.core.{p}" for i in range(2) for p in "ef"}
    new = {k for k in mem.state_dict() if ".core." in k}
    assert new == {f"blocks.{i}.attn.core.kv.{p}" for i in range(2) for p in ("weight", "bias")}

    # Linformer: the paper's N(0, 1/k) entries (k = 64 on a 14 x 14 grid: 12544 per matrix), not timm's 0.02
    for block in lin.blocks:
        for p in (block.attn.core.e, block.attn.core.f):
            assert p.shape == (1, 64, 196)
            assert abs(p.std().item() * 64**0.5 - 1) < 0.03 and abs(p.mean().item()) < 0.01
    assert not torch.equal(lin.blocks[0].attn.core.e, lin.blocks[1].attn.core.e)
    # memory_compressed: the cell mean, 1/9 on each channel's own 3 x 3 taps (2 * 32 channels, groups of 16)
    weight = mem.blocks[0].attn.core.kv.weight
    assert weight.shape == (64, 16, 3, 3)
    own = torch.zeros(64, 16, 1, 1)
    own[torch.arange(64), torch.arange(64) % 16] = 1
    torch.testing.assert_close(weight, own.expand(-1, -1, 3, 3) / 9, rtol=0, atol=0)
    assert mem.blocks[1].attn.core.kv.bias.abs().max() == 0

    for model in (lin, mem):
        model.train()
        # All tokens, not the logits: the last layer's patch outputs (the only users of its E, F or
        # convolution) do not reach the class-token logits.
        model.forward_features(images["160x96"]).square().mean().backward()
        for name, p in model.named_parameters():
            if ".core." in name:
                assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- batch independence


@pytest.mark.parametrize(
    "core",
    [
        lambda: KroneckerCore(DIM, HEADS),
        lambda: LinformerCore(DIM, HEADS, k=6, sharing="none", ref_size=4),
        lambda: MemoryCompressedCore(DIM, HEADS, compression=2),
    ],
    ids=["kronecker", "linformer", "memory_compressed"],
)
def test_batch_independence(core):
    torch.manual_seed(0)
    core = core().double().eval()
    q, k, v = _qkv(batch=3)
    out = core(q, k, v, GRID, PREFIX)
    alone = core(q[1:2], k[1:2], v[1:2], GRID, PREFIX)
    torch.testing.assert_close(out[1:2], alone, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out[1].sum(), (q, k, v))
    for g in grads:
        assert g[0].abs().max() == 0 and g[2].abs().max() == 0 and g[1].abs().max() > 0


# ---------------------------------------------------------------- bad hyperparameters


@pytest.mark.parametrize(
    "attn, kwargs, match",
    [
        ("kronecker", {"variant": "qkv"}, r"kronecker \(ViT mixer\): variant='qkv' .* use variant='kv'"),
        ("kronecker", {"heads": 2}, r"kronecker as a ViT attention does not take \['heads'\]; it accepts"),
        ("linformer", {"k": 0}, r"linformer: k must be a positive int, got 0"),
        ("linformer", {"sharing": "layerwise"}, r"linformer: sharing must be one of .*'headwise'"),
        ("linformer", {"ref_size": (0, 4)}, r"linformer: ref_size must be a positive int or a pair"),
        ("memory_compressed", {"compression": 0}, r"memory_compressed: compression must be a positive int"),
        ("memory_compressed", {"compression": 2.0}, r"memory_compressed: compression must be int, got float"),
    ],
)
def test_bad_hyperparameters(attn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mixer_class(attn, **kwargs)
    with pytest.raises(ValueError, match=match):
        visattn.create_model(NAME, attn, attn_kwargs=kwargs, **TINY)
