"""The block contract (DESIGN.md), checked for every registered block.

Parametrised over ``visattn.list_attns()``: a new block is checked without new test code. A block
can only be exempted through its AttnInfo capability fields.
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from helpers import build, draw_zero_parameters_, feature_map, fixed_state_function, raster_jacobian_support

import visattn
from visattn.bench import count_flops

NAMES = visattn.list_attns()
C = 32
CAUSAL_NAMES = visattn.list_attns(causal=True)


def test_registry_is_not_empty():
    assert len(NAMES) >= 5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [16, 32, 64, 256])
def test_constructs_with_defaults(name, channels):
    block = visattn.create_attn(name, channels)
    assert isinstance(block, torch.nn.Module)


@pytest.mark.parametrize("name", NAMES)
def test_constructor_signature(name):
    params = inspect.signature(type(visattn.create_attn(name, C)).__init__).parameters
    for p in list(params.values())[2:]:
        assert p.kind == p.KEYWORD_ONLY, f"{name}: hyperparameter {p.name!r} must be keyword-only"
    assert "device" in params and "dtype" in params


@pytest.mark.parametrize("name", NAMES)
def test_shapes_any_size(name):
    block = build(name).eval()
    with torch.no_grad():
        for b in (1, 3):
            for h, w in [(1, 1), (7, 13), (16, 16), (33, 17)]:
                x = feature_map(b, C, h, w)
                out = block(x)
                assert out.shape == x.shape, f"{name}: {tuple(x.shape)} -> {tuple(out.shape)}"
                assert torch.isfinite(out).all(), f"{name}: non-finite output at {(b, h, w)}"


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name):
    block = build(name).train()
    x = feature_map(2, C, 7, 13, requires_grad=True)
    out = block(x)
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in block.named_parameters():
        assert p.grad is not None, f"{name}: parameter {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: parameter {pname} has a non-finite gradient"
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", [n for n in NAMES if visattn.attn_info(n).identity_init])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_identity_at_init(name, mode):
    torch.manual_seed(0)
    block = visattn.create_attn(name, C).train(mode == "train")
    x = feature_map(2, C, 9, 11)
    with torch.no_grad():
        out = block(x)
    assert (out - x).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_batch_independence_in_eval(name):
    block = build(name).eval()
    x = feature_map(3, C, 9, 11)
    y = x.clone()
    y[1] = feature_map(1, C, 9, 11, seed=5)[0] * 3.0
    with torch.no_grad():
        a, b = block(x), block(y)
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[2], b[2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[1], b[1]), f"{name}: output ignores its own input"


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_in_eval(name):
    block = build(name).eval()
    x = feature_map(2, C, 8, 10)
    with torch.no_grad():
        torch.testing.assert_close(block(x), block(x), atol=0, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_finite_under_bf16_autocast_and_large_inputs(name):
    block = build(name).eval()
    x = feature_map(2, C, 8, 10)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
        assert torch.isfinite(out.float()).all(), f"{name}: non-finite under bf16 autocast"
        out = block(x * 1e3)
        assert torch.isfinite(out).all(), f"{name}: non-finite for inputs scaled by 1e3"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(C, 8, 8),
        torch.zeros(2, C + 1, 8, 8),
        torch.zeros(2, C, 8, 8, dtype=torch.int64),
    ],
    ids=["3d", "channels", "int"],
)
def test_bad_input_raises_value_error(name, bad):
    block = build(name, perturb=False)
    with pytest.raises(ValueError) as err:
        block(bad)
    msg = str(err.value)
    assert name in msg, msg
    assert f"(B, {C}, H, W)" in msg, msg
    assert str(tuple(bad.shape)) in msg, msg


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_deepcopy(name):
    block = build(name, seed=0).eval()
    other = build(name, seed=1).eval()
    other.load_state_dict(block.state_dict())
    x = feature_map(2, C, 6, 9)
    with torch.no_grad():
        ref = block(x)
        torch.testing.assert_close(other(x), ref, atol=0, rtol=0)
        torch.testing.assert_close(copy.deepcopy(block)(x), ref, atol=0, rtol=0)


@pytest.mark.parametrize("name", CAUSAL_NAMES)
def test_causal_no_future_leak(name):
    h, w = 5, 7
    block = build(name, causal=True).eval()
    support = raster_jacobian_support(block, C, h, w)
    future = torch.triu(torch.ones_like(support), diagonal=1)
    leaks = (support & future).nonzero().tolist()
    assert not leaks, f"{name}: output p depends on future input q (p, q): {leaks[:10]}"
    past = torch.tril(torch.ones_like(support), diagonal=-1)
    if visattn.attn_info(name).token_mixing:
        assert (support & past).any(), (
            f"{name}: causal output never depends on the past (test would be vacuous)"
        )
    else:  # token-wise: the exact support is the diagonal, which is a stronger check than "no future"
        assert torch.equal(support, torch.eye(len(support), dtype=torch.bool)), f"{name}: not token-wise"


@pytest.mark.parametrize("size", [(6, 7), (20, 23)])
@pytest.mark.parametrize("name", CAUSAL_NAMES)
def test_causal_no_future_leak_in_value(name, size):
    """Gradients miss leaks through discrete choices (bucket, cluster or query selection): changing
    every future pixel must leave every past output unchanged. 20 x 23 = 460 tokens spans several
    chunks, bands or segments at the blocks' default sizes (e.g. Reformer's 64-token chunks)."""
    h, w = size
    block = build(name, causal=True).eval()
    x = feature_map(1, C, h, w, seed=3)
    with torch.no_grad():
        ref = block(x).flatten(2)
        for p in (5, h * w // 3, 2 * h * w // 3):
            y = x.clone().flatten(2)
            y[..., p + 1 :] = feature_map(1, C, 1, h * w - p - 1, seed=p).flatten(2) * 3
            out = block(y.view_as(x)).flatten(2)
            leak = (out[..., : p + 1] - ref[..., : p + 1]).abs().max().item()
            assert leak <= 1e-5, f"{name}: changing pixels after {p} changes earlier outputs by {leak:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_flop_growth_within_declared_exponent(name):
    info = visattn.attn_info(name)
    block = build(name).eval()
    with torch.no_grad():
        small = count_flops(block, feature_map(1, C, 16, 16))
        large = count_flops(block, feature_map(1, C, 32, 32))
    assert small > 0, f"{name}: FlopCounterMode counted no FLOPs (an uncounted op?)"
    exponent = math.log(large / small) / math.log(4)
    assert exponent <= info.flops_exponent + 0.1, f"{name}: FLOPs grow as N^{exponent:.3f}"


@pytest.mark.parametrize("name", NAMES)
def test_compile_matches_eager(name):
    info = visattn.attn_info(name)
    block = build(name).eval()
    # Every block shares AttnBlock.forward's code object; without a reset, dynamo's per-code-object
    # recompile limit (8) is exhausted after a few blocks compiled separately in one process.
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="eager", fullgraph=info.compile_fullgraph)
    x = feature_map(2, C, 8, 12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x), atol=1e-5, rtol=1e-5)


# Blocks whose training forward draws fresh random numbers at every call (AttnInfo.random_in_training;
# test_random_in_training_list_is_exact keeps the flag honest by running every block twice in training mode
# under two seeds). Their gradients are checked in eval mode, where the draws are fixed buffers; every other
# block in training mode (BatchNorm batch statistics, EMA updates: the paths a training step runs).
RANDOM_IN_TRAINING = frozenset(n for n in visattn.list_attns() if visattn.attn_info(n).random_in_training)
# Blocks whose backward is a deliberate surrogate (AttnInfo.surrogate_gradient_exact), so finite differences
# cannot agree with it: only the parameters under those prefixes get the true gradient, and only they are
# checked (the input is held).
SURROGATE_GRADIENT_EXACT = {
    n: visattn.attn_info(n).surrogate_gradient_exact
    for n in visattn.list_attns()
    if visattn.attn_info(n).surrogate_gradient_exact
}
GRAD_C = 16


def _gates_drawn(name: str) -> torch.nn.Module:
    """The block with its all-zero parameters drawn from N(0, 0.1²) under a fixed seed: else the residual
    gates and zero output projections hide the attention path (as in visattn.bench.compiled)."""
    torch.manual_seed(0)
    return draw_zero_parameters_(visattn.create_attn(name, GRAD_C))


def _gradcheck_setup(name: str, batch: int, h: int, w: int):
    """A float64 block (gates drawn), a seeded input, and the function of (x, *params) to check."""
    block = _gates_drawn(name).double().train(name not in RANDOM_IN_TRAINING)
    exact = SURROGATE_GRADIENT_EXACT.get(name)
    named = dict(block.named_parameters())
    checked = [n for n in named if exact is None or n.startswith(exact)]
    params = [named[n].detach().clone().requires_grad_() for n in checked]
    # Every call starts from the same buffers (EMA bases, BatchNorm statistics) and the same seed, so
    # gradcheck's repeated forwards evaluate one function.
    x = feature_map(batch, GRAD_C, h, w, seed=1).double().requires_grad_(exact is None)
    fn = fixed_state_function(block, checked)
    return fn, (x, *params)


@pytest.mark.parametrize(
    ("batch", "h", "w"), [(1, 6, 7), (2, 6, 7), (1, 5, 3)], ids=["b1-6x7", "b2-6x7", "b1-5x3"]
)
@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_finite_differences(name, batch, h, w):
    """Input and parameter gradients equal central finite differences (float64, gradcheck's fast mode:
    one random projection per input, a few forwards). Batch 1 is where torch 2.14's eager CPU
    BatchNorm backward goes wrong on some gradient layouts (tools/repro/); batch 2 is the usual case."""
    fn, inputs = _gradcheck_setup(name, batch, h, w)
    torch.manual_seed(4)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_random_in_training_list_is_exact():
    """RANDOM_IN_TRAINING holds exactly the blocks whose training output changes with the global seed."""
    found = set()
    for name in NAMES:
        block = _gates_drawn(name).train()
        state = copy.deepcopy(block.state_dict())
        x = feature_map(2, GRAD_C, 6, 7)
        outs = []
        for seed in (1, 2):
            block.load_state_dict(state)
            torch.manual_seed(seed)
            with torch.no_grad():
                outs.append(block(x))
        if not torch.equal(*outs):
            found.add(name)
    assert found == RANDOM_IN_TRAINING
