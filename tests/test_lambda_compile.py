"""Lambda under torch.compile (issue 16): the reformulated block against the old formulation, and its
batch-1 gradient, which torch 2.14's eager CPU BatchNorm backward got wrong in the old formulation
(tools/repro/cpu_batchnorm_backward_strided_grad.py); inductor was right, so compiled and eager disagreed."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange

import visattn
from visattn.attn.lambda_layer import _PositionOutput


def _old_forward(block, x):
    """The formulation before issue 16: content lambda softmax(K) Vᵀ, used transposed."""
    b, _, hh, ww = x.shape
    n = hh * ww
    q, k, v = block.qkv(x).split(block.splits, dim=1)
    q = block.norm_q(q).view(b, block.heads, block.dim_k, n)
    k = k.view(b, block.dim_k, block.dim_u, n).softmax(dim=-1)
    v = block.norm_v(v).contiguous()
    content = torch.matmul(k.view(b, block.dim_k, -1), v.view(b, block.dim_v, -1).transpose(1, 2))
    y = torch.matmul((block.gamma * content).transpose(1, 2).unsqueeze(1), q)
    v_maps = v.view(b * block.dim_v, block.dim_u, hh, ww)
    y = y + _PositionOutput.apply(q, v_maps, block.gamma * block.embedding, block.recompute)
    return x + rearrange(y, "b h v (hh ww) -> b (h v) hh ww", hh=hh)


def _block(seed=0, **kwargs):
    torch.manual_seed(seed)
    block = visattn.create_attn("lambda", 16, dim_k=4, heads=2, r=5, **kwargs)
    with torch.no_grad():
        block.gamma.fill_(0.7)
        for bn in (block.norm_q, block.norm_v):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.normal_(1, 0.2)
            bn.bias.normal_(0, 0.2)
    return block


def _outputs_and_grads(forward, block, x, cotangent):
    x = x.clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    out = forward(x)
    (out * cotangent).sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dim_u", [1, 2])
def test_eager_matches_old_formulation(train, dim_u):
    """Batch 2 (where the old formulation's gradient was right): outputs and gradients agree to 1e-6."""
    block = _block(dim_u=dim_u).train(train)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 7, 9, generator=g)
    cotangent = torch.randn(2, 16, 7, 9, generator=g)
    state = {k: v.clone() for k, v in block.state_dict().items()}
    new = _outputs_and_grads(block, block, x, cotangent)
    block.load_state_dict(state)  # train mode moved the running statistics
    old = _outputs_and_grads(lambda t: _old_forward(block, t), block, x, cotangent)
    # Same products, summed in another order by the GEMM at |u| > 1: equal to rounding, not bitwise.
    for a, b in [(new[0], old[0]), (new[1], old[1])] + [(new[2][k], old[2][k]) for k in old[2]]:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * max(1.0, b.abs().max().item()))
    assert set(new[2]) == set(old[2]) and set(block.state_dict()) == set(state)


@pytest.mark.parametrize("dim_u", [1, 2])
def test_batch_one_gradient_is_exact(dim_u):
    """fp64 finite differences at B = 1, training mode: the old formulation failed this."""
    torch.manual_seed(0)
    block = visattn.create_attn("lambda", 8, dim_k=4, heads=2, dim_u=dim_u, r=3).double().train()
    with torch.no_grad():
        block.gamma.fill_(0.7)
    x = torch.randn(1, 8, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_inductor_input_gradient_matches_eager():
    """The bench's failing case (B = 1, training mode): compiled input gradient = eager's (1e-4 relative)."""
    torch.manual_seed(0)
    block = visattn.create_attn("lambda", 64).train()
    with torch.no_grad():
        block.gamma.fill_(0.5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 64, 16, 16, generator=g)
    cotangent = torch.randn(1, 64, 16, 16, generator=g)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="inductor", fullgraph=True)
    out, grad, _ = _outputs_and_grads(block, block, x, cotangent)
    cout, cgrad, _ = _outputs_and_grads(compiled, block, x, cotangent)
    scale = grad.abs().max().item()
    torch.testing.assert_close(cout, out, rtol=1e-4, atol=1e-4 * out.abs().max().item())
    torch.testing.assert_close(cgrad, grad, rtol=1e-4, atol=1e-4 * scale)
