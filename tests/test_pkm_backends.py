"""pkm's two value-table reads: EmbeddingBag ("bag") and gathers + batched matmul ("gather").

The gather path exists because CUDA's EmbeddingBag has no bf16 kernel for the per-sample-weights
backward; it must compute the same outputs and gradients, and the default path must stay EmbeddingBag
wherever that has every kernel (CPU results unchanged).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import build, feature_map

import visattn
from visattn.attn import pkm as pkm_mod

# (atol relative to the reference's max |value|): fp32 is the 1e-6; bf16 has 8 mantissa bits and
# the two paths round their sums at different points (the gather path sums in fp32), so a few ulps.
TOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2}


def _run(block, x, seed=7):
    """Output, input gradient and dense parameter gradients of one forward+backward."""
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = block(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    (out * g).sum().backward()
    grads = {n: p.grad.to_dense() for n, p in block.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach(), grads


def _pair(dtype, *, b, c, h, w, sparse=False, **kwargs):
    """The same perturbed block, once per read path, and an input, all in ``dtype``."""
    blocks = {
        vr: build("pkm", c, seed=1, value_read=vr, sparse_values=sparse, **kwargs).to(dtype)
        for vr in ("bag", "gather")
    }
    return blocks, feature_map(b, c, h, w, seed=2).to(dtype)


def _close(got, ref, dtype, what):
    scale = ref.abs().max().clamp_min(1e-30).item()
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]:g} x {scale:.3g}"


CASES = [
    # batch > 1, odd sizes, topk > n_keys (k1 = n_keys), heads > 1
    dict(b=3, c=24, h=5, w=7, n_keys=7, topk=5, heads=3, k_dim=10),
    dict(b=2, c=13, h=3, w=1, n_keys=4, topk=9, heads=2, k_dim=6),
    dict(b=1, c=16, h=1, w=1, n_keys=5, topk=3, heads=1, k_dim=4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c['b']}c{c['c']}h{c['h']}w{c['w']}")
def test_gather_matches_bag_outputs_and_gradients(case, dtype):
    case = dict(case)
    b, c, h, w = (case.pop(k) for k in ("b", "c", "h", "w"))
    blocks, x = _pair(dtype, b=b, c=c, h=h, w=w, **case)
    ref_out, ref_dx, ref_dp = _run(blocks["bag"], x)
    out, dx, dp = _run(blocks["gather"], x)
    assert out.dtype == dtype and dx.dtype == dtype
    _close(out - x, ref_out - x, dtype, "output")
    _close(dx, ref_dx, dtype, "input gradient")
    assert dp.keys() == ref_dp.keys() and "values.weight" in dp
    for name, g in ref_dp.items():
        assert dp[name].dtype == dtype, name
        _close(dp[name], g, dtype, name)


def test_gather_bf16_table_gradient_is_nearer_fp64_than_bag():
    """The gather path sums the table's gradient in fp32, so in bf16 it is at least as accurate as
    EmbeddingBag's, here where every slot is read by hundreds of tokens (op level: same slots, same weights)."""
    gen = torch.Generator().manual_seed(5)
    m, k, n, c = 600, 8, 6, 5
    table = torch.randn(n, c, generator=gen).bfloat16()
    slots = torch.randint(0, n, (m, k), generator=gen)
    w = torch.rand(m, k, generator=gen).bfloat16()
    g = torch.randn(m, c, generator=gen).bfloat16()

    def grads(read, dtype):
        t, ww = (a.to(dtype, copy=True).requires_grad_(True) for a in (table, w))
        read(t, ww).backward(g.to(dtype))
        return t.grad.double(), ww.grad.double()

    def bag(t, ww):
        return F.embedding_bag(slots, t, mode="sum", per_sample_weights=ww)

    def gather(t, ww):
        return pkm_mod._GatherWeightedSum.apply(t, slots, ww, False)

    ref_t, ref_w = grads(bag, torch.float64)
    torch.testing.assert_close(grads(gather, torch.float64)[0], ref_t, rtol=1e-12, atol=1e-12)
    errs = {f.__name__: (grads(f, torch.bfloat16)[0] - ref_t).abs().max().item() for f in (bag, gather)}
    assert errs["gather"] <= errs["bag"], errs
    assert errs["gather"] <= 2e-3 * ref_t.abs().max().item(), errs  # one bf16 rounding of an exact sum


def test_sparse_values_gradient_is_sparse_and_equal():
    blocks, x = _pair(torch.float32, b=2, c=12, h=3, w=5, sparse=True, n_keys=4, topk=3, heads=2, k_dim=6)
    grads = {}
    for vr, blk in blocks.items():
        _run(blk, x)
        assert blk.values.weight.grad.is_sparse, vr
        grads[vr] = blk.values.weight.grad.to_dense()
    _close(grads["gather"], grads["bag"], torch.float32, "sparse values.weight")


def test_default_cpu_path_is_embedding_bag_bitwise():
    """The default (auto) block on CPU computes exactly the EmbeddingBag sum it always did."""
    block = build("pkm", 16, seed=3, n_keys=6, topk=4, heads=2, k_dim=8)
    assert block.value_read == "auto"
    x = feature_map(2, 16, 3, 5, seed=4)
    b, c, h, w = x.shape
    with torch.no_grad():
        tokens = x.flatten(2).transpose(1, 2).reshape(-1, c)
        scores, slots = block.lookup(tokens)
        wts = F.softmax(scores.float(), dim=-1).reshape(b * h * w, -1)
        mem = F.embedding_bag(
            slots.reshape(b * h * w, -1), block.values.weight, mode="sum", per_sample_weights=wts
        )
        ref = x + block.proj(mem).reshape(b, h * w, c).transpose(1, 2).reshape(b, c, h, w)
        assert torch.equal(block(x), ref)


def test_chunked_gather_equals_one_chunk(monkeypatch):
    """Chunking the gather over tokens (to bound memory) changes nothing: the sums per token are the same."""
    blocks, x = _pair(torch.float32, b=2, c=8, h=4, w=5, n_keys=4, topk=3, heads=2, k_dim=4)
    whole = _run(blocks["gather"], x)
    # per token: 2 heads x 3 slots x 8 channels = 48 elements; 100 -> 2 tokens per chunk, 20 chunks
    monkeypatch.setattr(pkm_mod, "_GATHER_CHUNK_ELEMENTS", 100)
    assert len(pkm_mod._chunks(40, 48)) == 20
    chunked = _run(blocks["gather"], x)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
    for name, g in whole[2].items():
        torch.testing.assert_close(chunked[2][name], g, rtol=0, atol=1e-7)


def test_gather_path_compiles_fullgraph_with_its_backward():
    """The GPU sweep compiles pkm in bf16, i.e. the gather path: its autograd.Function (forward, chunk
    loop and backward) traces into one graph, dynamic sizes included, and matches eager."""
    blocks, x = _pair(torch.float32, b=2, c=16, h=3, w=5, n_keys=5, topk=4, heads=2, k_dim=8)
    torch._dynamo.reset()
    compiled = torch.compile(blocks["gather"], backend="aot_eager", fullgraph=True, dynamic=True)
    for hw in ((3, 5), (4, 6)):
        x = feature_map(2, 16, *hw, seed=2)
        ref = _run(blocks["gather"], x)
        got = _run(compiled, x)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        got_grads = {n.removeprefix("_orig_mod."): g for n, g in got[2].items()}
        assert got_grads.keys() == ref[2].keys()
        for name, g in ref[2].items():
            torch.testing.assert_close(got_grads[name], g, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "device,dtype,expected",
    [
        ("cuda", torch.bfloat16, "gather"),
        ("cuda:1", torch.bfloat16, "gather"),
        (torch.device("cuda", 0), torch.bfloat16, "gather"),
        ("cuda", torch.float32, "bag"),
        ("cuda", torch.float16, "bag"),
        ("cuda", torch.float64, "bag"),
        ("cpu", torch.float32, "bag"),
        ("cpu", torch.bfloat16, "bag"),
        ("cpu", torch.float16, "bag"),
        ("mps", torch.float32, "gather"),
        ("xpu", torch.bfloat16, "gather"),
    ],
    ids=str,
)
def test_chooser_auto(device, dtype, expected):
    assert pkm_mod._value_read_backend(device, dtype) == expected
    assert pkm_mod._value_read_backend(device, dtype, "auto") == expected


@pytest.mark.parametrize("setting", ["bag", "gather"])
def test_chooser_override_wins(setting):
    for device, dtype in [("cuda", torch.bfloat16), ("cpu", torch.float32), ("mps", torch.float16)]:
        assert pkm_mod._value_read_backend(device, dtype, setting) == setting


def test_block_takes_the_chosen_path(monkeypatch):
    """The forward asks the chooser with the value table's device, dtype and the block's setting, and
    follows its answer."""
    calls, hits = [], []
    real_apply = pkm_mod._GatherWeightedSum.apply

    def spy(device, dtype, setting="auto"):
        calls.append((torch.device(device).type, dtype, setting))
        return "gather"  # as the chooser answers on CUDA in bf16

    block = build("pkm", 8, seed=0, n_keys=3, topk=2, heads=1, k_dim=4)
    monkeypatch.setattr(pkm_mod, "_value_read_backend", spy)
    monkeypatch.setattr(pkm_mod._GatherWeightedSum, "apply", lambda *a: hits.append(1) or real_apply(*a))
    block(feature_map(1, 8, 2, 2)).sum().backward()
    assert calls == [("cpu", torch.float32, "auto")] and hits == [1]
    assert block.values.weight.grad.abs().max() > 0


@pytest.mark.parametrize("bad", ["Gather", "embedding_bag", ""])
def test_unknown_value_read_is_rejected_at_construction(bad):
    with pytest.raises(ValueError, match=r"^pkm: value_read must be one of auto, bag, gather, got"):
        visattn.create_attn("pkm", 16, value_read=bad)
    with pytest.raises(ValueError, match=r"^pkm: value_read must be str"):  # the registry's type check
        visattn.create_attn("pkm", 16, value_read=None)


@pytest.mark.gpu
def test_gpu_pkm_trains_one_step_in_bf16():
    """The issue's failure: one bf16 training step on CUDA (EmbeddingBag raised in its backward)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert pkm_mod._value_read_backend("cuda", torch.bfloat16) == "gather"
    block = build("pkm", 64, seed=1).cuda().to(torch.bfloat16)
    x = feature_map(2, 64, 37, 45, seed=2).cuda().to(torch.bfloat16)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    before = block.values.weight.detach().clone()
    out, dx, dp = _run(block, x)
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()
    assert all(torch.isfinite(g).all() for g in dp.values()) and dp["values.weight"].abs().max() > 0
    opt.step()
    assert not torch.equal(before, block.values.weight.detach())
    # Same output as EmbeddingBag's bf16 forward (which has a CUDA kernel) with the same weights; a
    # comparison against fp32 would differ in which top-k slots bf16 rounding selects, not in the read.
    block.value_read = "bag"
    with torch.no_grad():
        bag_out = block(x)
        block.value_read = "auto"
        _close(block(x) - x, bag_out - x, torch.bfloat16, "output")
    # The read's gradients against fp32 EmbeddingBag on CUDA, for the same slots and weights.
    gen = torch.Generator().manual_seed(5)
    m, k, n, c = 5000, 128, 4096, 64
    table, w, g = (torch.randn(*s, generator=gen).cuda() for s in ((n, c), (m, k), (m, c)))
    slots = torch.randint(0, n, (m, k), generator=gen).cuda()
    grads = {}
    for name, dtype in (("gather", torch.bfloat16), ("bag", torch.float32)):
        t, ww = (a.to(dtype, copy=True).requires_grad_(True) for a in (table, w))
        if name == "gather":
            out = pkm_mod._GatherWeightedSum.apply(t, slots, ww, False)
        else:
            out = F.embedding_bag(slots, t, mode="sum", per_sample_weights=ww)
        out.backward(g.to(dtype))
        grads[name] = (out.detach(), t.grad, ww.grad)
    for what, got, ref in zip(("output", "table gradient", "weight gradient"), grads["gather"], grads["bag"]):
        _close(got, ref, torch.bfloat16, what)
