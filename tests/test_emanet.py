"""Targeted tests of the EMANet block: the EM algorithm written plainly, the moving average of the
bases, EM's monotone objective and the mmsegmentation layout."""

from __future__ import annotations

import pytest
import torch
from helpers import build, feature_map

import visattn

F64 = torch.float64


def _randomise_bn_(block: torch.nn.Module, seed: int = 3) -> None:
    # Non-trivial running statistics, so the eval-mode BN is part of what is checked.
    g = torch.Generator().manual_seed(seed)
    bn = block.ema_out_conv.bn
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g, dtype=F64))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g, dtype=F64) + 0.5)


def _plain_em(block, x_b: torch.Tensor, stages: int, init=None) -> tuple[torch.Tensor, torch.Tensor]:
    """EM of one sample (C, H, W) from the bases ``init`` (default: the block's buffer), written out:
    returns the final bases (C, K) and responsibilities (N, K)."""
    mid = block.ema_mid_conv.conv
    c = x_b.shape[0]
    feats = mid.weight.reshape(c, c).to(F64) @ x_b.reshape(c, -1).to(F64) + mid.bias.to(F64)[:, None]
    mu = (block.ema_module.bases if init is None else init)[0].to(F64).clone()
    for _ in range(stages):
        scores = feats.T @ mu  # (N, K)
        z = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
        z = z / z.sum(dim=1, keepdim=True)
        mu = feats @ (z / z.sum(dim=0, keepdim=True))
        mu = mu / mu.norm(dim=0, keepdim=True)
    return mu, z


def _plain_forward(block, x: torch.Tensor) -> torch.Tensor:
    """The eval-mode EMA unit, one sample at a time."""
    out = []
    c = x.shape[1]
    bn = block.ema_out_conv.bn
    w_out = block.ema_out_conv.conv.weight.reshape(c, c).to(F64)
    for b in range(x.shape[0]):
        mu, z = _plain_em(block, x[b], block.ema_module.num_stages)
        recon = torch.relu(mu @ z.T)
        y = w_out @ recon
        y = (y - bn.running_mean.to(F64)[:, None]) / torch.sqrt(bn.running_var.to(F64)[:, None] + bn.eps)
        y = y * bn.weight.to(F64)[:, None] + bn.bias.to(F64)[:, None]
        out.append(x[b].to(F64) + y.reshape(x[b].shape))
    return torch.stack(out)


def test_emanet_defaults_are_the_papers():
    block = visattn.create_attn("emanet", 32)
    assert block.ema_module.num_stages == 3
    assert block.ema_module.momentum == 0.1
    assert tuple(block.ema_module.bases.shape) == (1, 32, 64)
    torch.testing.assert_close(block.ema_module.bases.norm(dim=1), torch.ones(1, 64))
    assert "ema_module.bases" not in dict(block.named_parameters())


@pytest.mark.parametrize("dtype, atol", [(F64, 1e-10), (torch.float32, 1e-5)])
def test_emanet_matches_plain_em(dtype, atol):
    block = build("emanet", 8, num_bases=5, dtype=dtype).eval()
    _randomise_bn_(block)
    x = feature_map(2, 8, 5, 6).to(dtype)
    with torch.no_grad():
        out = block(x)
    torch.testing.assert_close(out.to(F64), _plain_forward(block, x), atol=atol, rtol=0)


def test_emanet_moving_average_in_training_only():
    block = build("emanet", 8, num_bases=5, dtype=F64)
    x = feature_map(3, 8, 4, 5).to(F64)
    before = block.ema_module.bases.clone()
    block.eval()
    with torch.no_grad():
        block(x)
    torch.testing.assert_close(block.ema_module.bases, before, atol=0, rtol=0)

    block.train()
    with torch.no_grad():
        block(x)
    finals = torch.stack([_plain_em(block, x[b], 3, before)[0] for b in range(3)])
    mean = finals.mean(0, keepdim=True)
    mean = mean / mean.norm(dim=1, keepdim=True)
    expected = 0.9 * before + 0.1 * mean
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(block.ema_module.bases, expected, atol=1e-10, rtol=0)
    assert (block.ema_module.bases - before).abs().max() > 1e-4


def test_emanet_eval_output_independent_of_batch_after_training_step():
    block = build("emanet", 16)
    with torch.no_grad():
        block.train()(feature_map(4, 16, 6, 6, seed=7))  # move the bases away from their init
        block.eval()
        alone = block(feature_map(1, 16, 6, 7, seed=1))
        others = feature_map(4, 16, 6, 7, seed=2) * 5.0
        others[2] = feature_map(1, 16, 6, 7, seed=1)[0]
        together = block(others)
    torch.testing.assert_close(together[2], alone[0], atol=1e-5, rtol=1e-5)


def test_emanet_em_objective_never_decreases():
    # EM on the mixture sum_k exp(x·μ_k) with unit μ_k: sum_n logsumexp_k(x_n·μ_k) cannot decrease.
    block = build("emanet", 8, num_bases=6, dtype=F64).eval()
    feats = feature_map(2, 8, 6, 6, seed=4).to(F64).flatten(2) * 2.0
    ema = block.ema_module

    def objective(bases):
        return torch.logsumexp(torch.einsum("bcn,bck->bnk", feats, bases), dim=-1).sum()

    values = [objective(ema.bases.expand(2, -1, -1))]
    for stages in range(1, 8):
        ema.num_stages = stages
        values.append(objective(ema.em(feats)[0]))
    values = torch.stack(values)
    assert (values[1:] - values[:-1] >= -1e-10).all(), values
    assert values[-1] > values[0] + 1e-3, values


def test_emanet_gradient_reaches_input_projection_not_bases():
    block = build("emanet", 8, num_bases=4).train()
    x = feature_map(2, 8, 5, 5, requires_grad=True)
    out = block(x)
    (out * feature_map(2, 8, 5, 5, seed=9)).sum().backward()
    assert block.ema_mid_conv.conv.weight.grad.abs().max() > 0
    assert not block.ema_module.bases.requires_grad


def test_emanet_mmseg_layout():
    # decode_head.ema_{module,mid_conv,out_conv}.* of mmseg's EMAHead (ema_channels 512, num_bases 64).
    state = visattn.create_attn("emanet", 512).state_dict()
    expected = {
        "ema_module.bases": (1, 512, 64),
        "ema_mid_conv.conv.weight": (512, 512, 1, 1),
        "ema_mid_conv.conv.bias": (512,),
        "ema_out_conv.conv.weight": (512, 512, 1, 1),
        "ema_out_conv.bn.weight": (512,),
        "ema_out_conv.bn.bias": (512,),
        "ema_out_conv.bn.running_mean": (512,),
        "ema_out_conv.bn.running_var": (512,),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert set(state) == set(expected) | {"ema_out_conv.bn.num_batches_tracked"}


@pytest.mark.parametrize(
    "kwargs", [{"num_bases": 0}, {"num_stages": 0}, {"momentum": 1.5}, {"num_bases": 2.5}]
)
def test_emanet_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^emanet: "):
        visattn.create_attn("emanet", 16, **kwargs)
