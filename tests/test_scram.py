"""SCRAM: PatchMatch candidates, the k = N limit, recall of the true top-k keys, the carried scores against
the re-scoring reference, and float64 end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import build, feature_map
from test_precision import Float32Spy

import visattn
from visattn.attn import scram


def _qkv(block, x):
    tokens = x.flatten(2).transpose(1, 2)
    q, k, v = block.qkv(tokens).chunk(3, dim=-1)
    b, n, c = q.shape
    h = block.heads
    return [t.view(b, n, h, c // h).transpose(1, 2) for t in (q, k, v)]


def _naive(block, x, index):
    """Softmax over each query's listed keys, one query at a time, in float64."""
    q, k, v = (t.double() for t in _qkv(block, x))
    b, h, n, d = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for p in range(n):
                keys = index[bi, hi, p] if index is not None else torch.arange(n)
                s = k[bi, hi, keys] @ q[bi, hi, p] / math.sqrt(d)
                out[bi, hi, p] = torch.softmax(s, 0) @ v[bi, hi, keys]
    proj = block.proj.weight.double() @ out.transpose(1, 2).reshape(b, n, -1).transpose(1, 2)
    proj = proj + block.proj.bias.double().view(1, -1, 1)
    return x.double() + proj.view_as(x)


def test_k_at_least_n_equals_full_attention():
    block = build("scram", 16, k=64, heads=2, iterations=2).eval()
    x = feature_map(2, 16, 5, 7, seed=3)
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out.double(), _naive(block, x, None), atol=1e-5, rtol=1e-5)


def test_output_is_attention_over_the_found_keys():
    block = build("scram", 16, k=5, heads=2).eval()
    x = feature_map(2, 16, 6, 5, seed=1)
    with torch.no_grad():
        q, k, _ = _qkv(block, x)
        index = block.patchmatch(q, k, 6, 5)
        out = block(x)
    assert index.shape == (2, 2, 30, 5)
    assert (index.sort(-1).values.diff(dim=-1) > 0).all(), "candidates must be distinct"
    torch.testing.assert_close(out.double(), _naive(block, x, index), atol=1e-5, rtol=1e-5)


def _recall(found, true):
    hits = (found.unsqueeze(-1) == true.unsqueeze(-2)).any(-1).float()
    return hits.mean().item()


@pytest.mark.parametrize("smooth", [False, True])
def test_recall_of_true_top_k_beats_random_candidates(smooth):
    torch.manual_seed(0)
    h, w, d, kk = 16, 16, 16, 8
    block = visattn.create_attn("scram", 16, k=kk, iterations=4, seed=7).eval()
    q = torch.randn(1, 1, h * w, d)
    key = torch.randn(1, 1, h * w, d)
    if smooth:  # spatially coherent features, PatchMatch's premise
        grid = key.view(1, h, w, d).permute(0, 3, 1, 2)
        key = torch.nn.functional.avg_pool2d(grid, 3, 1, 1).permute(0, 2, 3, 1).reshape(1, 1, h * w, d)
    true = (q @ key.transpose(-1, -2)).topk(kk, dim=-1).indices
    found = block.patchmatch(q, key, h, w)
    random = torch.rand(1, 1, h * w, h * w).topk(kk, dim=-1).indices
    r_pm, r_rand = _recall(found, true), _recall(random, true)
    assert r_rand < 0.06
    assert r_pm > 5 * r_rand and r_pm > 0.25, (r_pm, r_rand)


def test_more_iterations_raise_recall():
    torch.manual_seed(1)
    q, key = torch.randn(1, 2, 256, 8), torch.randn(1, 2, 256, 8)
    true = (q @ key.transpose(-1, -2)).topk(8, dim=-1).indices
    recalls = []
    for it in (0, 2, 6):
        block = visattn.create_attn("scram", 16, k=8, iterations=it, seed=3).eval()
        recalls.append(_recall(block.patchmatch(q, key, 16, 16), true))
    assert recalls[0] < recalls[1] < recalls[2], recalls


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"iterations": -1}, {"heads": 3}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^scram: "):
        visattn.create_attn("scram", 16, **kwargs)


def test_search_levels_and_mod_are_the_integer_formulas():
    from visattn.attn.scram import _mod, search_levels

    for radius in range(1, 5000):
        assert search_levels(radius).item() == max(1, math.ceil(math.log2(radius)) + 1), radius
    a = torch.arange(1000)
    for n in (1, 7, 64, 999):
        assert torch.equal(_mod(a, n), a % n)


@pytest.mark.slow
def test_onnx_dynamic_hw_matches_eager(tmp_path):
    pytest.importorskip("onnxruntime")
    from visattn import export

    block = export._perturbed("scram", 32)
    path = export.export_onnx(block, torch.randn(2, 32, 16, 20), tmp_path / "scram.onnx", dynamic=True)
    for size in [(1, 1), (3, 2), (13, 9), (20, 16)]:  # k > N, and maps taller than wide
        assert export.onnx_max_error(path, block, torch.randn(2, 32, *size)) <= 1e-4, size


# --- issue 16: scores carried, not recomputed; float64 stays float64 ---------------------------------

# Odd grids, one-row and one-column grids (a neighbour shift of size 0), lists longer than the map.
SEARCH_CASES = [(5, 7, 4, 3), (13, 9, 16, 4), (1, 11, 3, 4), (9, 1, 5, 3), (17, 23, 16, 4), (2, 2, 9, 2)]


def _search_inputs(h, w, dtype, seed, heads=2, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, h * w, d, generator=g, dtype=dtype) for _ in range(2)]


@pytest.mark.parametrize(
    ("dtype", "fused"),
    [(torch.float64, True), (torch.float32, True), (torch.float64, False)],
    ids=["f64-fused", "f32-fused", "f64-gather"],
)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_carried_scores_select_what_rescoring_every_round_selects(monkeypatch, training, dtype, fused):
    """The search that scores only new proposals returns the very lists (ids and order) of the reference
    that re-scores the whole union every round with gathered per-pixel neighbours (the code before issue 16).
    The gather path (compiled and exported graphs) in float64 only: its batched matmul rounds differently
    for different list lengths, so in float32 a near-tie may fall either way (both are a PatchMatch)."""
    monkeypatch.setattr(scram, "_fused_scores", lambda q: fused)
    for i, (h, w, k, iterations) in enumerate(SEARCH_CASES):
        block = visattn.create_attn("scram", 16, k=k, iterations=iterations, seed=i).train(training)
        q, key = _search_inputs(h, w, dtype, seed=i)
        torch.manual_seed(i)  # the seed a training call draws
        found = block.patchmatch(q, key, h, w)
        torch.manual_seed(i)
        expected = block._reference_patchmatch(q, key, h, w)
        assert torch.equal(found, expected), (h, w, k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("size", [(7, 5), (3, 11)])
def test_outputs_and_gradients_equal_the_reference_search(dtype, size):
    """Block output and the gradients of the input and of every parameter (q, k, v projections, output
    projection) are bit-identical with the re-scoring search. SCRAM has no causal mode (causal=False)."""
    block = build("scram", 16, k=6, heads=2, seed=2).to(dtype).eval()
    reference = copy.deepcopy(block)
    reference.patchmatch = reference._reference_patchmatch
    results = []
    for b in (block, reference):
        x = feature_map(2, 16, *size, seed=3).to(dtype).requires_grad_()
        out = b(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        results.append([out, x.grad] + [p.grad for p in b.parameters()])
    assert all(torch.equal(a, e) for a, e in zip(*results))
    assert results[0][2].abs().sum() > 0, "the qkv projection must receive a gradient"


def test_fused_scores_equal_gathered_scores_and_do_not_depend_on_the_list():
    """listed_scores' sampled matmul equals gather + matmul to rounding, and a key's score has the same
    bits wherever it stands in whatever list (what makes a carried score the recomputed one), also for
    lists longer than the map (split into CSR patterns of at most N x N)."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        q, key = _search_inputs(5, 6, dtype, seed=4, d=32)
        ids = torch.randint(0, 30, (2, 2, 30, 64), generator=torch.Generator().manual_seed(5))
        fused = scram.listed_scores(q, key, ids)
        assert fused.dtype == dtype and fused.shape == ids.shape
        gathered = torch.einsum(
            "bhnd,bhnud->bhnu",
            q,
            key[:, :, None]
            .expand(-1, -1, 30, -1, -1)
            .gather(3, ids.unsqueeze(-1).expand(-1, -1, -1, -1, 32)),
        )
        torch.testing.assert_close(fused, gathered, atol=tol, rtol=0)
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(6))
        assert torch.equal(scram.listed_scores(q, key, ids[..., perm].contiguous()), fused[..., perm])
        assert torch.equal(scram.listed_scores(q, key, ids[..., 5:21].contiguous()), fused[..., 5:21])


def test_integer_radii_are_the_halved_radii():
    """The random-search radius floor(r0 / 2^level) by integer division equals the float formula it
    replaced, floor(r0 * 0.5^level) (exact in float32 for these sizes), for every level the search uses."""
    for radius0 in range(1, 3000):
        levels = scram.search_levels(radius0).item()
        level = torch.arange(levels)
        halved = (radius0 * torch.pow(0.5, level.float())).floor().clamp_min(1).long()
        assert torch.equal((radius0 // (1 << level)).clamp_min(1), halved), radius0


@pytest.mark.parametrize("better_first", [True, False])
def test_float64_search_resolves_a_tie_of_float32(better_first):
    """Two keys whose scores differ by 1e-12 (equal in float32): a float64 search keeps the better one.
    The search before issue 16 compared float32 copies of the scores and kept the wrong key here."""
    base = [1.0, 1.0, 2.0, 3.0, 0.5, 0.5]
    base[0 if better_first else 1] += 1e-12
    key = torch.tensor([[b, 0.0] for b in base], dtype=torch.float64).view(1, 1, 6, 2)
    q = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(1, 1, 6, 2)
    best = torch.tensor(base, dtype=torch.float64).topk(3).indices.sort().values
    for seed in range(3):
        block = visattn.create_attn("scram", 2, heads=1, k=3, iterations=4, seed=seed).eval()
        found = block.patchmatch(q, key, 1, 6).sort(-1).values
        assert torch.equal(found, best.expand_as(found)), seed


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "gather"])
def test_float64_forward_backward_has_no_float32_step_and_matches_finite_differences(monkeypatch, fused):
    """float64 end to end on both scoring paths: no op of a forward+backward returns a float32 tensor,
    the output is softmax attention over the found keys computed in float64 (to 1e-10), and input and
    parameter gradients equal central finite differences (gradcheck, 4 x 3 map)."""
    monkeypatch.setattr(scram, "_fused_scores", lambda q: fused)
    block = build("scram", 8, k=5, heads=2, seed=1).double().eval()
    x = feature_map(1, 8, 4, 3, seed=2).double().requires_grad_()
    spy = Float32Spy()
    with spy:
        out = block(x)
        out.sum().backward()
    assert out.dtype == torch.float64 and not spy.found, spy.found
    with torch.no_grad():
        q, k, _ = _qkv(block, x)
        index = block.patchmatch(q, k, 4, 3)
    torch.testing.assert_close(out, _naive(block, x.detach(), index), atol=1e-10, rtol=0)
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    names = [n for n, _ in block.named_parameters()]

    def fn(x, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x.detach().requires_grad_(), *params), fast_mode=True)
