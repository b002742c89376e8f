"""The causal scans' chunk length: chosen for the device in one place (default_chunk_size), None in
every block by default, an int overrides it, and the result never depends on it (issue 16)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import build, feature_map

import visattn
import visattn.layers.delta_rule as delta_mod
import visattn.layers.linear_attention as la
from visattn.bench.chunks import sweep_chunk_sizes
from visattn.layers.delta_rule import delta_rule
from visattn.layers.linear_attention import causal_linear_scan, default_chunk_size, linear_attention

F64 = torch.float64
BLOCKS = ("linear", "performer", "performer_v1", "rfa", "slim", "dpfp")

# The (kind, Dk, Dv) each block's causal scan sees at channels=32, heads=1 (head dim d = 32), and the
# CPU chunk length that default_chunk_size gives for it: Dv is d + 1 where the denominator rides along
# as a value column; performer/slim use m = int(d ln d) = 110 features, performer_v1 2m = 220, rfa
# 2·64 = 128, dpfp 2dν = 64 with the delta rule.
SCAN_OF_BLOCK = {
    "linear": (("linear", 32, 33), 32),
    "performer": (("linear", 110, 33), 64),
    "performer_v1": (("linear", 220, 33), 64),
    "rfa": (("linear", 128, 33), 64),
    "slim": (("linear", 110, 33), 64),
    "dpfp": (("delta", 64, 32), 32),
}


# ---------------------------------------------------------------------------------------------------
# default_chunk_size: the table
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "dk", "dv", "expected"),
    [
        ("linear", 8, 9, 32),  # clamped up to the smallest CPU chunk
        ("linear", 16, 17, 32),
        ("linear", 32, 33, 32),
        ("linear", 64, 65, 64),
        ("linear", 110, 33, 64),  # √3630 ≈ 60 -> 64
        ("linear", 64, 33, 64),  # √2112 ≈ 46 -> 64 (nearest power of two on a log scale)
        ("linear", 128, 129, 128),
        ("linear", 512, 513, 128),  # clamped down to the largest
        ("delta", 16, 16, 32),
        ("delta", 64, 32, 32),  # 0.5·√2048 ≈ 22.6 -> 32 (clamp)
        ("delta", 64, 64, 32),
        ("delta", 128, 128, 64),
        ("delta", 512, 512, 64),
    ],
)
def test_cpu_table(kind, dk, dv, expected):
    for dtype in (torch.float32, F64, torch.bfloat16, torch.float16):  # the CPU choice ignores dtype
        assert default_chunk_size("cpu", dtype, dk, dv, kind) == expected
    assert default_chunk_size(torch.device("cpu"), torch.float32, dk, dv, kind) == expected


@pytest.mark.parametrize("device", ["cuda", torch.device("cuda", 1), "mps", "meta", "xpu"])
@pytest.mark.parametrize("kind", ["linear", "delta"])
def test_accelerators_get_64(device, kind):
    for dtype in (torch.bfloat16, torch.float32):
        for dk, dv in ((8, 9), (32, 33), (110, 33), (512, 512)):
            assert default_chunk_size(device, dtype, dk, dv, kind) == 64


def test_default_chunk_size_rejects_bad_arguments():
    with pytest.raises(ValueError, match="default_chunk_size: kind must be 'linear' or 'delta'"):
        default_chunk_size("cpu", torch.float32, 32, 32, "softmax")
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="default_chunk_size: head_dim_k must be a positive int"):
            default_chunk_size("cpu", torch.float32, bad, 32)
        with pytest.raises(ValueError, match="default_chunk_size: head_dim_v must be a positive int"):
            default_chunk_size("cpu", torch.float32, 32, bad)


# ---------------------------------------------------------------------------------------------------
# Blocks: None by default, resolved at call time through default_chunk_size
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BLOCKS)
def test_default_is_none_and_shown(name):
    block = visattn.create_attn(name, 32, causal=True)
    assert block.chunk_size is None
    assert "chunk_size=None" in block.extra_repr()
    assert "chunk_size=16" in visattn.create_attn(name, 32, causal=True, chunk_size=16).extra_repr()


@pytest.mark.parametrize("name", BLOCKS)
def test_none_equals_the_chosen_int_bitwise(name, monkeypatch):
    (scan, chosen) = SCAN_OF_BLOCK[name]
    calls = []

    def spy(device, dtype, head_dim_k, head_dim_v, kind="linear"):
        calls.append((torch.device(device).type, dtype, kind, head_dim_k, head_dim_v))
        return default_chunk_size(device, dtype, head_dim_k, head_dim_v, kind)

    monkeypatch.setattr(la, "default_chunk_size", spy)
    monkeypatch.setattr(delta_mod, "default_chunk_size", spy)
    auto = build(name, 32, heads=1, causal=True).eval()
    fixed = copy.deepcopy(auto)
    fixed.chunk_size = chosen
    x = feature_map(2, 32, 9, 11)  # 99 tokens: several chunks and a padded last one at 32 or 64
    with torch.no_grad():
        out_auto = auto(x)
        assert calls == [("cpu", torch.float32, *scan)]  # resolved once, at call time, from the scan's dims
        out_fixed = fixed(x)
        assert len(calls) == 1  # an explicit int is used as given
    assert torch.equal(out_auto, out_fixed)


def test_a_different_chunk_is_not_bitwise_equal():
    """The bitwise test above can tell chunk lengths apart: 16 and the chosen 32 round differently."""
    auto = build("linear", 32, heads=1, causal=True).eval()
    other = copy.deepcopy(auto)
    other.chunk_size = 16
    x = feature_map(2, 32, 9, 11)
    with torch.no_grad():
        a, b = auto(x), other(x)
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The result does not depend on the chunk length (float64, odd lengths)
# ---------------------------------------------------------------------------------------------------

CHUNKS = (1, 7, 64, None)


def _inputs(n, dk, dv, *, seed, positive=True):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(3, n, dk, generator=g, dtype=F64) for _ in range(2))
    if positive:
        q, k = F.elu(q) + 1, F.elu(k) + 1
    v = torch.randn(3, n, dv, generator=g, dtype=F64)
    return q, k, v, g


def _out_and_grads(fn, inputs, seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, leaves, cot))


def _assert_all_close(results):
    first = results[0]
    for other in results[1:]:
        for a, b in zip(first, other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("n", [67, 101])
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_causal_scan_independent_of_chunk(n, decay, recompute):
    q, k, v, g = _inputs(n, 5, 6, seed=n)
    ins = [q, k, v]
    if decay:
        ins.append(-F.softplus(torch.randn(3, n, generator=g, dtype=F64)))
    results = [
        _out_and_grads(lambda *t, c=c: causal_linear_scan(*t, chunk_size=c, recompute=recompute), ins)
        for c in CHUNKS
    ]
    _assert_all_close(results)


@pytest.mark.parametrize("n", [67, 101])
def test_delta_rule_independent_of_chunk(n):
    q, k, v, g = _inputs(n, 6, 5, seed=n)
    q, k = q / q.sum(-1, keepdim=True), k / k.sum(-1, keepdim=True)  # DPFP's sum normalisation
    beta = torch.rand(3, n, generator=g, dtype=F64)
    results = [_out_and_grads(lambda *t, c=c: delta_rule(*t, chunk_size=c), (q, k, v, beta)) for c in CHUNKS]
    _assert_all_close(results)


@pytest.mark.parametrize("name", BLOCKS)
def test_blocks_independent_of_chunk(name):
    base = build(name, 32, heads=1, causal=True).eval().double()
    x = feature_map(1, 32, 7, 11).double()  # 77 tokens
    results = []
    for c in CHUNKS:
        block = copy.deepcopy(base)
        block.chunk_size = c
        results.append(_out_and_grads(block, (x,)))
    _assert_all_close(results)


# ---------------------------------------------------------------------------------------------------
# Bad values
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BLOCKS)
@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "64"])
def test_bad_chunk_size_names_the_block(name, bad):
    with pytest.raises(ValueError, match=rf"^{name}: chunk_size must be (a positive )?int or None"):
        visattn.create_attn(name, 32, causal=True, chunk_size=bad)


@pytest.mark.parametrize("bad", [0, -1, True, 3.0])
def test_bad_chunk_size_names_the_function(bad):
    q = torch.rand(1, 5, 4)
    beta = torch.rand(1, 5)
    with pytest.raises(ValueError, match="^causal_linear_scan: chunk_size must be a positive int or None"):
        causal_linear_scan(q, q, q, chunk_size=bad)
    with pytest.raises(ValueError, match="^linear_attention: chunk_size must be a positive int or None"):
        linear_attention(q, q, q, chunk_size=bad)
    with pytest.raises(ValueError, match="^delta_rule: chunk_size must be a positive int or None"):
        delta_rule(q, q, q, beta, chunk_size=bad)


# ---------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------

KEYS = {
    "kind",
    "chunk_size",
    "tokens",
    "batch_heads",
    "head_dim",
    "dtype",
    "device",
    "fwd_bwd_ms",
    "flops",
    "tflops",
    "is_default",
}


def test_sweep_rows_on_cpu():
    rows = sweep_chunk_sizes(
        device="cpu",
        dtype=torch.float32,
        sizes=(8, 4),
        tokens=40,
        batch_heads=2,
        head_dim=4,
        rounds=2,
        min_time=1e-3,
    )
    # the CPU default (32 for Dk = Dv = 4) is swept although ``sizes`` lacks it; sizes ascending per kind
    assert [(r["kind"], r["chunk_size"]) for r in rows] == [
        ("linear", 4),
        ("linear", 8),
        ("linear", 32),
        ("delta", 4),
        ("delta", 8),
        ("delta", 32),
    ]
    for r in rows:
        assert set(r) == KEYS
        assert (r["tokens"], r["batch_heads"], r["head_dim"]) == (40, 2, 4)
        assert (r["dtype"], r["device"]) == ("float32", "cpu")
        assert r["flops"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["tflops"] == pytest.approx(r["flops"] / (r["fwd_bwd_ms"] * 1e-3) / 1e12)
        assert r["is_default"] == (r["chunk_size"] == 32)
    for kind in ("linear", "delta"):
        assert sum(r["is_default"] for r in rows if r["kind"] == kind) == 1
        # longer chunks do more quadratic work inside each chunk: FLOPs grow with the chunk length
        flops = [r["flops"] for r in rows if r["kind"] == kind]
        assert flops == sorted(flops) and len(set(flops)) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizes": ()}, "sizes must be a non-empty sequence"),
        ({"sizes": (4, 0)}, "every chunk size must be a positive int"),
        ({"tokens": 0}, "tokens must be a positive int"),
        ({"rounds": 0}, "rounds must be a positive int"),
        ({"min_time": 0}, "min_time must be a number of seconds > 0"),
        ({"dtype": torch.int64}, "dtype must be a floating torch.dtype"),
    ],
)
def test_sweep_rejects_bad_arguments(kwargs, message):
    args = dict(device="cpu", dtype=torch.float32, sizes=(4,), tokens=8, batch_heads=1, head_dim=2)
    with pytest.raises(ValueError, match=f"^sweep_chunk_sizes: {message}"):
        sweep_chunk_sizes(**{**args, **kwargs})
