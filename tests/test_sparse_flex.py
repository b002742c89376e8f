"""The sparse-pattern engine's FlexAttention backend (visattn.layers.flex_backend) against the reference path.

On CPU FlexAttention runs its uncompiled forward only (an unfused reference that materialises the scores;
no backward), so the CPU equivalence tests are forward-only on tiny maps (8 x 9 and smaller), and block
sizes of 16 on the engine tests make tiny maps span many FlexAttention blocks. Gradient equivalence and
the compiled CUDA kernel are `gpu`-marked (run with `pytest -m gpu` on a CUDA machine).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import build, feature_map, perturb_

from visattn.layers import flex_backend as fb
from visattn.layers import sparse_pattern as sp
from visattn.layers.sparse_pattern import (
    Grid,
    Pattern,
    block_segment,
    column_segment,
    dense_mask,
    row_segment,
    shared_segment,
    sparse_attention,
    window_segment,
    window_tile,
    with_shared_keys,
)

# The uncompiled-flex performance warning is expected on CPU.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# Max |flex - reference| over max |reference| per dtype (both paths compute in the dtype; bf16 keeps 8 bits).
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------------ pattern blocks

BLOCKS = [
    ("longformer", dict(kernel_size=3, num_global=2), (8, 9)),
    ("longformer", dict(kernel_size=3, num_global=0, causal=True), (5, 7)),
    ("longformer", dict(kernel_size=5, dilation=2), (8, 9)),
    ("bigbird", dict(), (8, 9)),
    ("bigbird", dict(causal=True), (7, 5)),
    ("sparse_transformer", dict(), (8, 9)),
    ("diet", dict(), (8, 9)),
    ("gmat", dict(), (5, 7)),
    ("etc", dict(), (8, 9)),
    ("bpt", dict(), (8, 9)),
    ("multiscale", dict(), (7, 9)),
    ("jukebox", dict(), (5, 7)),
]


@pytest.mark.parametrize("name,kwargs,size", BLOCKS, ids=lambda v: str(v).replace(" ", ""))
def test_block_forward_flex_matches_reference(name, kwargs, size):
    block = build(name, 16, **kwargs).eval()
    x = feature_map(2, 16, *size)
    with torch.no_grad():
        with sp.backend("reference"):
            ref = block(x) - x
        with sp.backend("flex"):
            out = block(x) - x
    assert ref.abs().max() > 1e-3  # the attention contributes (perturbed output projection)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("name,kwargs", [("longformer", dict(kernel_size=3, num_global=2)), ("etc", dict())])
def test_block_forward_flex_matches_reference_bf16(name, kwargs):
    # Large weights: the attention term must dominate x, or bf16 rounding of x + attn(x) hides it.
    block = perturb_(build(name, 16, perturb=False, **kwargs), scale=1.0).eval().to(torch.bfloat16)
    x = feature_map(1, 16, 8, 9).to(torch.bfloat16)
    with torch.no_grad():
        with sp.backend("reference"):
            ref = block(x).float() - x.float()
        with sp.backend("flex"):
            out = block(x).float() - x.float()
    assert rel_err(out, ref) < TOL[torch.bfloat16]


# ------------------------------------------------------------------------------------------- engine


def window_pattern(h, w, k=3, *, n_global=2, causal=False):
    tile = window_tile(k, h, w)
    grid = Grid(-(-h // tile[0]) * tile[0], -(-w // tile[1]) * tile[1], h, w)
    seg = window_segment(grid, k, tile=tile, causal=causal)
    if n_global:
        seg = with_shared_keys(seg, torch.arange(grid.n, grid.n + n_global))
    return Pattern(grid, (seg,), causal, extra=n_global)


def strided_pattern(rows, cols, *, causal=True, length=None):
    """Sparse Transformer's two tilings (raster band by rows + column), joint softmax on the reference path."""
    grid = Grid(rows, cols, length=length)
    band = row_segment(grid, (-1, 0, 1), radius=cols)
    return Pattern(grid, (band, column_segment(grid, min_row_distance=2)), causal)


def qkv(pattern, c=8, b=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, m = pattern.grid.n, pattern.grid.n + pattern.extra
    return [torch.randn(b, t, c, generator=g).to(dtype) for t in (n, m, m)]


ENGINE = [
    ("window+globals 13x21", lambda: window_pattern(13, 21, 3, n_global=2)),
    ("window causal 11x17", lambda: window_pattern(11, 17, 5, n_global=1, causal=True)),
    ("two tilings causal 9x10", lambda: strided_pattern(9, 10, length=85)),
    ("two tilings 6x7", lambda: strided_pattern(6, 7, causal=False)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("make", [m for _, m in ENGINE], ids=[i for i, _ in ENGINE])
def test_engine_flex_matches_reference(make, dtype):
    pattern = make()
    q, k, v = qkv(pattern, dtype=dtype)
    ref = sparse_attention(q, k, v, pattern, 2, scale=0.3)
    out = fb.flex_sparse_attention(q, k, v, pattern, 2, scale=0.3, block_size=16)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def test_engine_bias_and_heads_match_reference():
    """Per-segment, per-head additive bias (ETC's relative positions) as a score_mod; heads split as (h d)."""
    pattern = window_pattern(10, 12, 3, n_global=1)
    seg = pattern.segments[0]
    t, qn = seg.queries.shape
    bias = torch.randn(t, 4, qn, seg.keys.shape[1], generator=torch.Generator().manual_seed(3))
    q, k, v = qkv(pattern, c=16)
    ref = sparse_attention(q, k, v, pattern, 4, bias=[bias])
    out = fb.flex_sparse_attention(q, k, v, pattern, 4, bias=[bias], block_size=16)
    assert rel_err(out, ref) < TOL[torch.float32]
    # Broadcast bias (1, 1, Q, K) as well.
    ref = sparse_attention(q, k, v, pattern, 4, bias=[bias[:1, :1]])
    out = fb.flex_sparse_attention(q, k, v, pattern, 4, bias=[bias[:1, :1]], block_size=16)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_queries_without_keys_get_zero():
    """Jukebox's previous-row pattern: the first row has no key; both paths return exactly 0 there."""
    grid = Grid(4, 6)
    pattern = Pattern(grid, (row_segment(grid, (-1,)),), True)
    q, k, v = qkv(pattern)
    out = fb.flex_sparse_attention(q, k, v, pattern, 2, block_size=16)
    assert torch.equal(out[:, :6], torch.zeros_like(out[:, :6]))
    assert rel_err(out, sparse_attention(q, k, v, pattern, 2)) < TOL[torch.float32]


def test_shared_segment_extra_tokens_with_positions():
    """Extra tokens seen by causal queries from their extra_pos on (pooled cells)."""
    grid = Grid(5, 8)
    n = grid.n
    seg = shared_segment(grid, torch.arange(n + 3))
    pattern = Pattern(grid, (seg,), True, extra=3, extra_pos=torch.tensor([-1, 10, 33]))
    q, k, v = qkv(pattern)
    ref = sparse_attention(q, k, v, pattern, 2)
    out = fb.flex_sparse_attention(q, k, v, pattern, 2, block_size=16)
    assert rel_err(out, ref) < TOL[torch.float32]


# ------------------------------------------------------------------------------------ block mask


def plan_dense_mask(plan: fb.FlexPlan, n: int, m: int) -> torch.Tensor:
    """What FlexAttention attends, from the BlockMask alone: listed full blocks entirely, listed partial
    blocks through mask_mod, nothing elsewhere; returned in raster order (N, N + E)."""
    bm = plan.block_mask
    bs = bm.BLOCK_SIZE[0]
    out = torch.zeros(n, m, dtype=torch.bool)
    qi = torch.arange(n)[:, None]
    ki = torch.arange(m)[None, :]
    listed = [(bm.kv_num_blocks, bm.kv_indices, False), (bm.full_kv_num_blocks, bm.full_kv_indices, True)]
    for nums, idx, full in listed:
        for qb in range(nums.shape[-1]):
            for kb in idx[0, 0, qb, : nums[0, 0, qb]].tolist():
                rows = slice(qb * bs, min((qb + 1) * bs, n))
                cols = slice(kb * bs, min((kb + 1) * bs, m))
                if full:
                    out[rows, cols] = True
                else:
                    out[rows, cols] = bm.mask_mod(0, 0, qi[rows], ki[:, cols])
    if plan.rank is None:
        return out
    kv_rank = torch.cat([plan.rank, torch.arange(n, m)])
    return out[plan.rank][:, kv_rank]


@pytest.mark.parametrize("make", [m for _, m in ENGINE], ids=[i for i, _ in ENGINE])
def test_block_mask_is_exactly_the_pattern(make):
    """The kernel's view (block lists, full blocks, mask_mod) equals dense_mask: checks the block structure
    that the CPU forward (which applies mask_mod everywhere) cannot."""
    pattern = make()
    plan = fb.flex_plan(pattern, block_size=16)
    n, m = pattern.grid.n, pattern.grid.n + pattern.extra
    assert torch.equal(plan_dense_mask(plan, n, m), dense_mask(pattern))


def test_tiled_order_for_2d_windows():
    """A 7x7 window on a 32x128 map, blocks of 64: 16x4 token tiles need 376 non-empty blocks, raster
    order 848 (each 64-token half row meets 7 rows of keys), and the permuted mask is still exact."""
    pattern = window_pattern(32, 128, 7, n_global=0)
    plan = fb.flex_plan(pattern, block_size=64)
    mask = dense_mask(pattern)
    raster = mask.view(64, 64, 64, 64).any(3).any(1).sum().item()
    assert (plan.tile, plan.blocks, raster) == ((16, 4), 376, 848)
    assert torch.equal(plan_dense_mask(plan, 4096, 4096), mask)


def test_raster_order_for_row_patterns():
    """Row attention with rows of one block is already block-sparse in raster order: no permutation, and
    every block is full (no mask_mod)."""
    grid = Grid(16, 16)
    plan = fb.flex_plan(Pattern(grid, (row_segment(grid, (0,)),), False), block_size=16)
    assert (plan.tile, plan.order, plan.blocks, plan.full) == (None, None, 16, 16)


def test_full_blocks_for_block_sparse_patterns():
    """Big Bird-like 4x4 patches (own patch + patch 0): 4x4 tiles make every listed block full."""
    grid = Grid(16, 16)
    key_blocks = torch.stack([torch.arange(16), torch.zeros(16, dtype=torch.long)], 1)
    key_blocks[0, 1] = -1
    pattern = Pattern(grid, (block_segment(grid, 4, key_blocks),), False)
    plan = fb.flex_plan(pattern, block_size=16)
    assert (plan.tile, plan.blocks, plan.full) == ((4, 4), 31, 31)
    assert torch.equal(plan_dense_mask(plan, 256, 256), dense_mask(pattern))


# ------------------------------------------------------------------------------------------ cache


def test_plan_cache_hits_rebuilt_patterns_and_misses_different_ones():
    fb.cache_clear()
    p1 = fb.flex_plan(window_pattern(8, 9), block_size=16)
    p2 = fb.flex_plan(window_pattern(8, 9), block_size=16)  # rebuilt: equal tensors, new objects
    assert p2 is p1
    assert fb.cache_info() == {"hits": 1, "misses": 1, "size": 1}
    # Same shapes, other content: a miss, never a wrong plan.
    other = window_pattern(8, 9)
    seg = other.segments[0]
    other = other._replace(segments=(seg._replace(keys=seg.keys.flip(1)),))
    assert fb.flex_plan(other, block_size=16) is not p1
    assert fb.flex_plan(window_pattern(8, 9), block_size=16) is p1  # both kept (one shape bucket)
    assert fb.flex_plan(window_pattern(8, 9), block_size=32) is not p1  # block size is part of the key
    assert fb.cache_info() == {"hits": 2, "misses": 3, "size": 3}


def test_block_forward_reuses_plan():
    fb.cache_clear()
    block = build("longformer", 16, kernel_size=3).eval()
    x = feature_map(1, 16, 6, 7)
    with torch.no_grad(), sp.backend("flex"):
        block(x)
        block(x)
    assert fb.cache_info()["hits"] >= 1 and fb.cache_info()["misses"] == 1


# ------------------------------------------------------------------------------------- the choice


@pytest.mark.parametrize(
    "setting,device,grad,compiled,exporting,fused,expected",
    [
        ("auto", "cpu", False, False, False, True, "reference"),
        ("auto", "cpu", True, True, False, True, "reference"),
        ("auto", "cuda", True, False, False, True, "flex"),
        ("auto", "cuda", False, True, False, True, "flex"),
        ("auto", "cuda", True, False, False, False, "reference"),  # no Triton: no fused flex
        ("auto", "cuda", False, False, True, True, "reference"),  # torch.export stays portable
        ("reference", "cuda", True, True, False, True, "reference"),
        ("flex", "cpu", False, False, False, False, "flex"),
        ("flex", "cpu", False, True, False, False, "flex"),
        ("flex", "cuda", True, False, False, False, "flex"),
        ("flex", "cpu", False, False, True, True, "reference"),
    ],
)
def test_choose_backend_rule(monkeypatch, setting, device, grad, compiled, exporting, fused, expected):
    monkeypatch.setattr(sp, "_flex_runs_fused", lambda compiled: fused)
    with sp.backend(setting):
        assert sp.choose_backend(device, grad, compiled, exporting=exporting) == expected


def test_flex_on_cpu_training_is_an_error():
    block = build("longformer", 16, kernel_size=3)
    x = feature_map(1, 16, 5, 6, requires_grad=True)
    with sp.backend("flex"), pytest.raises(ValueError, match="no backward on CPU.*backend\\('auto'\\)"):
        block(x)


def test_backend_setting_is_checked_and_restored():
    assert sp.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown sparse-attention backend 'fast'.*auto, reference, flex"):
        sp.backend("fast")
    with pytest.raises(RuntimeError), sp.backend("flex"):
        assert sp.get_backend() == "flex"
        raise RuntimeError
    assert sp.get_backend() == "auto"
    previous = sp.backend("reference")  # plain call: process-wide
    assert sp.get_backend() == "reference"
    previous.__exit__(None, None, None)
    assert sp.get_backend() == "auto"


def test_environment_setting_is_checked(monkeypatch):
    monkeypatch.setattr(sp, "_backend_setting", "Flex")
    with pytest.raises(ValueError, match="VISATTN_SPARSE_BACKEND.*'Flex'"):
        sp.choose_backend("cpu", False, False)


def test_auto_on_cpu_is_the_reference_path_bitwise():
    """Default CPU training: bitwise the reference result, and no flex plan is ever built."""
    fb.cache_clear()
    block = build("etc", 16)
    x = feature_map(1, 16, 6, 7, requires_grad=True)
    out = block(x)
    with sp.backend("reference"):
        ref = block(x)
    assert torch.equal(out, ref)
    assert fb.cache_info() == {"hits": 0, "misses": 0, "size": 0}


@pytest.mark.slow
def test_flex_plan_under_torch_compile():
    """The plan is built eagerly (a graph break) and its BlockMask feeds the traced flex call; dynamo's
    eager backend on CPU (inductor's CPU flex template fails to lower this BlockMask in torch 2.14)."""
    block = build("longformer", 16, kernel_size=3, num_global=2).eval()
    x = feature_map(2, 16, 8, 9)
    with torch.no_grad():
        with sp.backend("reference"):
            ref = block(x)
        with sp.backend("flex"):
            out = torch.compile(block, backend="eager")(x)
    assert rel_err(out - x, ref - x) < TOL[torch.float32]


# -------------------------------------------------------------------------------------- GPU checks

GPU_BLOCKS = [
    ("longformer", dict(kernel_size=7, num_global=2)),
    ("longformer", dict(kernel_size=7, causal=True)),
    ("bigbird", dict()),
    ("sparse_transformer", dict()),
    ("etc", dict()),
    ("jukebox", dict()),
    ("bpt", dict()),
    ("multiscale", dict()),
    ("diet", dict()),
    ("gmat", dict()),
]
GPU_TOL = {torch.float32: 2e-3, torch.bfloat16: 5e-2}  # the fused kernel may use TF32 / other reductions


def _grads(block, x):
    block.zero_grad()
    x = x.detach().requires_grad_(True)
    out = block(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    (out * g).sum().backward()
    return out.detach(), x.grad.detach(), {n: p.grad.detach().clone() for n, p in block.named_parameters()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,kwargs", GPU_BLOCKS, ids=lambda v: str(v).replace(" ", ""))
def test_gpu_block_gradients_flex_match_reference(name, kwargs, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    block = build(name, 64, **kwargs).cuda().to(dtype)
    x = feature_map(2, 64, 37, 45).cuda().to(dtype)
    with sp.backend("reference"):
        ref_out, ref_dx, ref_dp = _grads(block, x)
    assert sp.choose_backend("cuda", True, False) == "flex"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, dx, dp = _grads(block, x)
    # The compiled kernel ran, not the unfused fallback that warns.
    assert not [w for w in caught if "without torch.compile" in str(w.message)]
    tol = GPU_TOL[dtype]
    assert rel_err(out - x, ref_out - x) < tol
    assert rel_err(dx, ref_dx) < tol
    for n, g in ref_dp.items():
        if g.abs().max() > 0:
            assert rel_err(dp[n], g) < tol, n


@pytest.mark.gpu
def test_gpu_engine_gradients_with_bias():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pattern = window_pattern(40, 56, 7, n_global=2)
    cuda = lambda t: t.cuda()  # noqa: E731
    seg = pattern.segments[0]
    pattern = pattern._replace(
        segments=(seg._replace(queries=cuda(seg.queries), keys=cuda(seg.keys), member=cuda(seg.member)),)
    )
    t, qn = seg.queries.shape
    bias = torch.randn(t, 4, qn, seg.keys.shape[1], device="cuda", requires_grad=True)
    q, k, v = (cuda(a).requires_grad_(True) for a in qkv(pattern, c=128))

    def run(name):
        with sp.backend(name):
            out = sparse_attention(q, k, v, pattern, 4, bias=[bias])
        grads = torch.autograd.grad((out * out.detach().cos()).sum(), (q, k, v, bias))
        return out, grads

    ref, ref_g = run("reference")
    out, g = run("flex")
    assert rel_err(out, ref) < GPU_TOL[torch.float32]
    for a, b in zip(g, ref_g, strict=True):
        assert rel_err(a, b) < GPU_TOL[torch.float32]
