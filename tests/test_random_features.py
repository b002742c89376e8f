"""Random-feature blocks (performer, slim, rfa) train correctly when a second
forward redraws the features before the first forward's backward: the redraw writes the projection buffer in place,
so a forward must not save the buffer itself for backward (RandomFeatures.current)."""

from __future__ import annotations

import copy

import pytest
import torch

import visattn

BLOCKS = {
    "performer": {},
    "slim": {},
    "rfa": {},
    "rfa_causal": {"causal": True},
}  # performer_v1 never redraws


def _grads(module):
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("label", list(BLOCKS))
def test_two_forwards_then_one_backward_with_a_redraw_between(label):
    name = label.split("_causal")[0]
    torch.manual_seed(0)
    block = visattn.create_attn(name, 16, redraw_interval=1, **BLOCKS[label]).train()
    for p in block.parameters():  # zero-initialised output gates would hide the attention path
        torch.nn.init.normal_(p, std=0.2)
    x1, x2 = torch.randn(2, 16, 5, 6), torch.randn(2, 16, 5, 6)

    separate = copy.deepcopy(block)  # each forward's backward before the next forward
    separate(x1).square().sum().backward()
    separate(x2).square().sum().backward()

    together = copy.deepcopy(block)  # both forwards first; the second one redraws the features
    y1 = together(x1)
    y2 = together(x2)
    (y1.square().sum() + y2.square().sum()).backward()

    assert torch.equal(together.random_features.calls, separate.random_features.calls)
    expected, got = _grads(separate), _grads(together)
    assert expected.keys() == got.keys() and expected
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_current_is_the_buffer_itself_when_nothing_can_redraw_it():
    from visattn.layers.linear_attention import RandomFeatures

    fixed = RandomFeatures(8, 4, redraw_interval=0, seed=1)
    assert fixed.current() is fixed.weight
    redrawn = RandomFeatures(8, 4, redraw_interval=3, seed=1)
    assert redrawn.current() is not redrawn.weight and torch.equal(redrawn.current(), redrawn.weight)
    assert redrawn.eval().current() is redrawn.weight
    with torch.no_grad():
        assert redrawn.train().current() is redrawn.weight
