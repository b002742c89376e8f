"""The CPU speed-ups of gcnet and cbam (issue 16) compute what the code before them computed.

Each block's previous forward is kept here, verbatim, as the reference. The faster code (hand-written
backward passes for the pooling steps) must give the same outputs and the same input and parameter
gradients, in float32 and float64, on odd sizes, batches > 1, channels-last inputs and inputs with
ties in the max-pooling; and it must actually run (a test that only exercised the reference would pass
on anything).
"""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st

import visattn
from visattn.bench.measure import saved_activation_bytes

TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def gcnet_reference(self, x: torch.Tensor) -> torch.Tensor:
    """GlobalContextBlock._forward before issue 16."""
    weights = rearrange(self.attn_logits(x), "b 1 h w -> b (h w) 1").softmax(dim=1)
    context = torch.bmm(rearrange(x, "b c h w -> b c (h w)"), weights)  # (B, C, 1)
    return x + self.transform(context.unsqueeze(-1))


def cbam_reference(self, x: torch.Tensor) -> torch.Tensor:
    """CBAM._forward before issue 16."""
    channel_logits = self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))
    x = x * channel_logits.sigmoid()
    pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
    return x * self.spatial(pooled).sigmoid()


REFERENCES = {"gcnet": gcnet_reference, "cbam": cbam_reference}
# The autograd node each fast path puts in the graph.
FAST_NODES = {"gcnet": "_ContextPoolBackward", "cbam": "_MeanMaxPoolBackward"}


def _block(name: str, channels: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The block with every parameter random (gcnet's last conv is zero at init, which would hide the
    transform's and the pooling's gradients)."""
    torch.manual_seed(seed)
    block = visattn.create_attn(name, channels).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block


def _graph_nodes(out: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def _outputs_and_grads(fn, block, x, grad_out):
    x = x.detach().requires_grad_(x.requires_grad)
    out = fn(x)
    inputs = [x] if x.requires_grad else []
    inputs += list(block.parameters())
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads, _graph_nodes(out)


def _check_equal(name, block, x, *, seed=1):
    """Outputs and gradients of the block (fast path) equal the reference forward's."""
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    fast, fast_grads, nodes = _outputs_and_grads(block, block, x, grad_out)
    ref, ref_grads, _ = _outputs_and_grads(lambda t: REFERENCES[name](block, t), block, x, grad_out)
    assert FAST_NODES[name] in nodes, f"{name}: the fast path did not run"
    # The forward runs the reference's own ops: bit-identical.
    assert torch.equal(fast, ref)
    assert len(fast_grads) == len(ref_grads)
    for got, want in zip(fast_grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL[x.dtype])


SHAPES = [(3, 24, 5, 7), (2, 16, 1, 1), (1, 40, 9, 2), (4, 8, 3, 11)]


@pytest.mark.parametrize("name", ["gcnet", "cbam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fast_backward_equals_previous_forward(name, dtype, shape):
    block = _block(name, shape[1], dtype)
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(2)).requires_grad_()
    _check_equal(name, block, x)


@pytest.mark.parametrize("name", ["gcnet", "cbam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_channels_last_and_frozen_input(name, dtype):
    """Max-pool ties (ReLU'd, rounded inputs: many equal maxima, zeros included) share the gradient as
    amax does; a channels-last input; an input that needs no gradient (only the parameters learn)."""
    block = _block(name, 24, dtype)
    gen = torch.Generator().manual_seed(3)
    tied = torch.randn(3, 24, 6, 5, generator=gen, dtype=dtype).mul(2).relu().round().requires_grad_()
    _check_equal(name, block, tied)
    channels_last = torch.randn(2, 24, 7, 6, generator=gen, dtype=dtype).to(memory_format=torch.channels_last)
    _check_equal(name, block, channels_last.requires_grad_())
    _check_equal(name, block, torch.randn(2, 24, 5, 5, generator=gen, dtype=dtype))


@pytest.mark.parametrize("name", ["gcnet", "cbam"])
def test_train_and_eval_modes_and_accumulation(name):
    """A training step through the block accumulates the same .grad as the reference, twice over (the
    fast backward adds into an existing .grad like any other), in train and eval mode."""
    for train in (True, False):
        block = _block(name, 16, torch.float64).train(train)
        ref_block = _block(name, 16, torch.float64).train(train)
        x = torch.randn(2, 16, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        for _ in range(2):
            block(xa).square().sum().backward()
            REFERENCES[name](ref_block, xb).square().sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])
        for p, q in zip(block.parameters(), ref_block.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["gcnet", "cbam"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_second_derivatives_equal_previous_forward(name, channels_last):
    """create_graph=True (gradient penalties): the hand-written backward is itself differentiated, and
    the second derivatives w.r.t. the input and every parameter equal the reference's."""
    block = _block(name, 8, torch.float64)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64, generator=gen)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    grad_out = torch.randn(2, 8, 3, 4, dtype=torch.float64, generator=gen)
    inputs = [x, *block.parameters()]
    results = []
    for fn in (block, lambda t: REFERENCES[name](block, t)):
        (gx,) = torch.autograd.grad(fn(x), x, grad_out, create_graph=True)
        second = torch.autograd.grad(gx.square().sum(), inputs, allow_unused=True)
        results.append([torch.zeros_like(t) if g is None else g for g, t in zip(second, inputs)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["gcnet", "cbam"])
def test_plain_ops_where_the_fast_path_does_not_apply(name):
    """No grad, autocast and compiled graphs run the reference ops (no custom node), with equal values."""
    block = _block(name, 16, torch.float32)
    x = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(block(x), REFERENCES[name](block, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x.requires_grad_())
        ref = REFERENCES[name](block, x)
    assert FAST_NODES[name] not in _graph_nodes(out)
    assert torch.equal(out, ref)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), REFERENCES[name](block, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["gcnet", "cbam"])
def test_fast_path_keeps_no_more_activations(name):
    block = _block(name, 32, torch.float32)
    x = torch.randn(2, 32, 16, 16, requires_grad=True)
    fast = saved_activation_bytes(block, x)
    ref = saved_activation_bytes(lambda t: REFERENCES[name](block, t), x)
    assert fast <= ref, (fast, ref)


@settings(max_examples=12, derandomize=True, deadline=None, database=None)
@given(
    name=st.sampled_from(["gcnet", "cbam"]),
    batch=st.integers(1, 3),
    channels=st.sampled_from([8, 16, 24]),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_fast_backward_equals_previous_forward_fuzzed(name, batch, channels, height, width, seed):
    block = _block(name, channels, torch.float64, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
    _check_equal(name, block, x.requires_grad_(), seed=seed + 1)
