"""torch.compile(fullgraph=True) in TRAINING mode for the blocks whose training step holds state or work a
graph cannot: performer, slim and rfa (the random-feature redraw, RandomFeatures.step) and reformer (its
de-duplication penalty, an opaque custom op under compile), and gmat and isab (issue 16's compiled fast path:
gmat's pattern building, isab's recomputed tail under torch.utils.checkpoint). aot_eager traces exactly what inductor would
get (dynamo + AOTAutograd, fullgraph) and runs the same aten ops as eager, so compiled and eager results
are compared bit for bit or to float rounding; the inductor run is ``slow``."""

import copy

import pytest
import torch

import visattn
from visattn.attn.reformer import _penalty_op
from visattn.layers.linear_attention import RandomFeatures

REDRAWING = [("performer", {"redraw_interval": 2}), ("slim", {"redraw_interval": 3}), ("rfa", {})]


def _graph_counter():
    """An aot_eager backend that counts the graphs dynamo hands it (1: no recompile, no graph break)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def fw(gm, example_inputs):
        return gm.forward

    counted = aot_autograd(fw_compiler=fw)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return counted(gm, example_inputs)

    return backend, graphs


def _perturbed(name, channels=32, **kwargs):
    torch.manual_seed(0)
    block = visattn.create_attn(name, channels, **kwargs).train()
    with torch.no_grad():  # the zero-initialised output path would hide the attention
        for p in block.parameters():
            if p.is_floating_point() and not p.any():
                p.normal_(0.0, 0.1)
    return block


def _same_training_step(eager, twin, compiled, x, *, seed=None, live=False) -> torch.Tensor:
    """One forward+backward of ``eager`` and of ``compiled`` (``twin`` compiled) on ``x``: the same output, input
    gradient and parameter gradients, which are then cleared. ``seed``: set before each forward (blocks that
    draw from the global generator); ``live``: every parameter must get a non-zero gradient."""
    outs, grads = [], []
    for module in (eager, compiled):
        x.grad = None
        if seed is not None:
            torch.manual_seed(seed)
        outs.append(module(x))
        outs[-1].square().sum().backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-6)
    for (k, p_e), p_c in zip(eager.named_parameters(), twin.parameters(), strict=True):
        if live:
            assert p_e.grad is not None and p_e.grad.abs().sum() > 0, k
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=0, atol=1e-6, msg=k)
        p_e.grad = p_c.grad = None
    return outs[0]


@pytest.mark.parametrize("name,kwargs", REDRAWING, ids=[n for n, _ in REDRAWING])
def test_redrawing_blocks_compile_fullgraph_in_training_like_eager(name, kwargs):
    eager = _perturbed(name, **kwargs)
    twin = copy.deepcopy(eager)
    backend, graphs = _graph_counter()
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    feats = eager.random_features
    interval = feats.redraw_interval
    x = torch.randn(2, 32, 7, 9, requires_grad=True)
    draws = [feats.weight.clone()]
    for call in range(1, 7):
        _same_training_step(eager, twin, compiled, x)
        # The buffers advance identically: the counter, and the projection redrawn at the same calls.
        state_e, state_c = eager.state_dict(), twin.state_dict()
        assert state_e.keys() == state_c.keys()
        assert all(torch.equal(state_e[k], state_c[k]) for k in state_e)
        assert int(twin.random_features.calls) == call
        expected = feats.draw(call // interval) if call % interval == 0 else draws[-1]
        assert torch.equal(twin.random_features.weight, expected.to(feats.weight))
        draws.append(twin.random_features.weight.clone())
    assert len(graphs) == 1  # one graph for every call: the counter's value is not a guard
    assert sum(not torch.equal(a, b) for a, b in zip(draws, draws[1:])) == 6 // interval


def test_random_features_state_dict_unchanged_and_old_checkpoints_load():
    torch.manual_seed(0)
    feats = RandomFeatures(8, 4, redraw_interval=2, seed=11).train()
    assert list(feats.state_dict()) == ["seed", "calls", "weight"]
    assert feats.seed.dtype == feats.calls.dtype == torch.int64 and feats.weight.shape == (8, 4)
    # A checkpoint taken after 3 calls (written by the Python-branch step) restores the schedule.
    old = {"seed": torch.tensor(11), "calls": torch.tensor(3), "weight": feats.draw(1)}
    feats.load_state_dict(old)
    feats.step()
    assert int(feats.calls) == 4 and torch.equal(feats.weight, feats.draw(2))
    feats.step()
    assert int(feats.calls) == 5 and torch.equal(feats.weight, feats.draw(2))
    feats.eval().step()  # eval counts nothing and redraws nothing
    assert int(feats.calls) == 5
    assert not torch.equal(feats.draw(2), feats.draw(1))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (no recompile limit carried over from another test's blocks)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _penalty_args(block, x):
    """The arguments of the block's one ``_penalty`` call in an eager forward of ``x``."""
    seen = {}
    method = block._penalty

    def spy(*args):
        seen["args"] = args
        return method(*args)

    block._penalty = spy
    try:
        block(x)
    finally:
        del block._penalty
    return seen["args"]


@pytest.mark.parametrize(
    "kwargs,hw",
    [
        ({}, (8, 8)),  # the paper's window: byte codes, de-dup only
        ({}, (7, 9)),  # padding: masked
        ({"causal": True}, (8, 8)),
        ({"attend_across_buckets": False, "n_hashes": 3}, (6, 11)),
        ({"allow_duplicates": True}, (8, 8)),  # nothing to count or mask: a broadcast (m, w) penalty
        ({"n_hashes": 1, "n_buckets": 4}, (5, 5)),
    ],
)
def test_reformer_penalty_op_equals_method(kwargs, hw):
    from visattn.attn.reformer import _penalty_fake

    block = _perturbed("reformer", chunk_size=16, **kwargs)
    args = _penalty_args(block, torch.randn(2, 32, *hw))
    flags = block._penalty_flags()
    ref = block._penalty(*args)
    got = _penalty_op(*args, *flags)
    assert got.dtype == ref.dtype == torch.float32 and torch.equal(got, ref)
    assert got.data_ptr() not in {a.data_ptr() for a in args if isinstance(a, torch.Tensor)}
    fake = _penalty_fake(*args, *flags)  # what the compiler plans for: the real shape and dtype
    assert fake.shape == ref.shape and fake.dtype == ref.dtype


@pytest.mark.parametrize("kwargs,hw", [({}, (7, 9)), ({"causal": True}, (8, 8))], ids=["padded", "causal"])
def test_reformer_compiles_fullgraph_in_training_like_eager(kwargs, hw):
    eager = _perturbed("reformer", chunk_size=16, **kwargs)
    twin = copy.deepcopy(eager)
    x = torch.randn(2, 32, *hw, requires_grad=True)
    backend, graphs = _graph_counter()
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    for _ in range(2):
        # The hash rotations are redrawn from the global generator in training, in the same order.
        _same_training_step(eager, twin, compiled, x, seed=3)
    assert len(graphs) == 1
    # The penalty is one opaque call in the graph (its gathers are not inlined into the pairwise loop).
    assert ["reformer_penalty" in str(node.target) for node in graphs[0].graph.nodes].count(True) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs", [*REDRAWING, ("reformer", {"chunk_size": 16})])
def test_inductor_training_fullgraph_matches_eager(name, kwargs):
    import torch._inductor.config as inductor_config

    eager = _perturbed(name, **kwargs)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="inductor")
    x = torch.randn(1, 32, 12, 12, requires_grad=True)
    with inductor_config.patch(fallback_random=True):
        for _ in range(3):
            x.grad = None
            torch.manual_seed(5)
            out_e = eager(x)
            out_e.square().sum().backward()
            grad_e = x.grad.clone()
            x.grad = None
            torch.manual_seed(5)
            out_c = compiled(x)
            out_c.square().sum().backward()
            torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(x.grad, grad_e, rtol=1e-4, atol=1e-5)
            state_e, state_c = eager.state_dict(), twin.state_dict()
            for k in state_e:
                torch.testing.assert_close(state_c[k], state_e[k], rtol=0, atol=0, msg=k)


# gmat and isab: one graph, and the same output, input gradient and parameter gradients as eager.
STATEFUL_GRAPHS = [
    # The paper's defaults (k = 15, M = 64) on a padded map: 9x11 is no multiple of the 8x8 query tile.
    ("gmat", {}, (9, 11)),
    ("isab", {}, (6, 7)),  # recompute=True: the tail runs under torch.utils.checkpoint
]


@pytest.mark.parametrize(
    "name,kwargs,hw", STATEFUL_GRAPHS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(STATEFUL_GRAPHS)]
)
def test_compiled_training_step_matches_eager(name, kwargs, hw):
    eager = _perturbed(name, channels=16, **kwargs)
    twin = copy.deepcopy(eager)
    backend, graphs = _graph_counter()
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    x = torch.randn(2, 16, *hw, requires_grad=True)
    for _ in range(2):  # the second call reuses the graph
        out = _same_training_step(eager, twin, compiled, x, live=True)
        assert not torch.equal(out, x)  # the attention path is live
    assert len(graphs) == 1
