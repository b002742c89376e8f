import pytest
import torch
from helpers import build, feature_map

import visattn


@pytest.mark.parametrize("use_scale", [False, True])
def test_equals_explicit_softmax(use_scale):
    block = build("nonlocal", 16, use_scale=use_scale).eval()
    x = feature_map(2, 16, 5, 7)
    with torch.no_grad():
        q = block.theta(x).flatten(2).transpose(1, 2)
        k = block.phi(x).flatten(2)
        v = block.g(x).flatten(2).transpose(1, 2)
        logits = q @ k
        if use_scale:
            logits = logits / q.shape[-1] ** 0.5
        y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, -1, 5, 7)
        expected = x + block.norm(block.out(y))
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_every_output_sees_every_input():
    block = build("nonlocal", 16).eval()
    x = feature_map(1, 16, 4, 5, requires_grad=True)
    (grad,) = torch.autograd.grad(block(x)[0, :, 0, 0].sum(), x)
    assert (grad[0].abs().sum(0) > 0).all()


def test_sub_sample_runs_on_odd_sizes():
    block = build("nonlocal", 16, sub_sample=True).eval()
    x = feature_map(1, 16, 5, 3)
    assert block(x).shape == x.shape


def test_invalid_reduction():
    with pytest.raises(ValueError, match="reduction"):
        visattn.create_attn("nonlocal", 16, reduction=32)
