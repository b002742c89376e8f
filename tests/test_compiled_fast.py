"""torch.compile(fullgraph=True) in TRAINING mode against eager for gmat and isab (issue 16's compiled
fast path): one graph, and the same output, input gradient and parameter gradients. aot_eager traces what
inductor would get (dynamo + AOTAutograd, fullgraph: gmat's pattern building, isab's recomputed tail under
torch.utils.checkpoint) and runs the same aten ops as eager, so the results agree to float rounding."""

import copy

import pytest
import torch

import visattn


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (every block shares AttnBlock.forward's code object)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graph_counter():
    """An aot_eager backend that records the graphs dynamo hands it (1: no recompile, no graph break)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []
    counted = aot_autograd(fw_compiler=lambda gm, example_inputs: make_boxed_func(gm.forward))

    def backend(gm, example_inputs):
        graphs.append(gm)
        return counted(gm, example_inputs)

    return backend, graphs


def _perturbed(name, channels, **kwargs):
    """The block in training mode with its all-zero parameters (zero-initialised output projections)
    drawn from N(0, 0.1²): else the output is the input and the attention path goes unchecked."""
    torch.manual_seed(0)
    block = visattn.create_attn(name, channels, **kwargs).train()
    with torch.no_grad():
        for p in block.parameters():
            if p.is_floating_point() and not p.any():
                p.normal_(0.0, 0.1)
    return block


CASES = [
    # The paper's defaults (k = 15, M = 64) on a padded map: 9x11 is no multiple of the 8x8 query tile.
    ("gmat", {}, (9, 11)),
    ("isab", {}, (6, 7)),  # recompute=True: the tail runs under torch.utils.checkpoint
]


@pytest.mark.parametrize("name,kwargs,hw", CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_compiled_training_step_matches_eager(name, kwargs, hw):
    eager = _perturbed(name, 16, **kwargs)
    twin = copy.deepcopy(eager)
    backend, graphs = _graph_counter()
    compiled = torch.compile(twin, fullgraph=True, backend=backend)
    x = torch.randn(2, 16, *hw, requires_grad=True)
    for _ in range(2):  # the second call reuses the graph
        x.grad = None
        out_e = eager(x)
        out_e.square().sum().backward()
        grad_e = x.grad.clone()
        x.grad = None
        out_c = compiled(x)
        out_c.square().sum().backward()
        assert not torch.equal(out_e, x)  # the attention path is live
        torch.testing.assert_close(out_c, out_e, rtol=0, atol=1e-6)
        torch.testing.assert_close(x.grad, grad_e, rtol=0, atol=1e-6)
        for (k, p_e), p_c in zip(eager.named_parameters(), twin.parameters(), strict=True):
            assert p_e.grad is not None and p_e.grad.abs().sum() > 0, k
            torch.testing.assert_close(p_c.grad, p_e.grad, rtol=0, atol=1e-6, msg=k)
            p_e.grad = p_c.grad = None
    assert len(graphs) == 1
