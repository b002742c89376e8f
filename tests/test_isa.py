"""Targeted tests of the ISA block: dense attention with an explicit group mask, the dependency pattern
of each step and of both (autograd), padding, and the mmsegmentation layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import build, feature_map

import visattn

F64 = torch.float64


def _randomise_bn_(block: torch.nn.Module, seed: int = 3) -> None:
    # Non-trivial running statistics, so the eval-mode BNs are part of what is checked.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                shape, dtype = m.running_mean.shape, m.running_mean.dtype
                m.running_mean.copy_(torch.randn(shape, generator=g, dtype=dtype))
                m.running_var.copy_(torch.rand(shape, generator=g, dtype=dtype) + 0.5)


def _dense_masked_step(sa, x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """One ISA step as dense attention over all H*W pixels, masked to pairs in the same group."""
    b, c, h, w = x.shape
    q = sa.query_project(x).flatten(2).transpose(1, 2)
    k = sa.key_project(x).flatten(2).transpose(1, 2)
    v = sa.value_project(x).flatten(2).transpose(1, 2)
    scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    same = group[:, None] == group[None, :]
    scores = scores.masked_fill(~same, float("-inf"))
    context = scores.softmax(dim=-1) @ v
    return sa.output_project(context.transpose(1, 2).reshape(b, c, h, w))


def _support(fn, c: int, h: int, w: int) -> torch.Tensor:
    """(N, N) bool: [p, q] is True when output pixel p has a non-zero gradient w.r.t. input pixel q
    (raster order); one batched backward over all N output pixels."""
    x = feature_map(1, c, h, w, seed=1).to(F64).requires_grad_(True)
    out = fn(x)
    n = h * w
    weights = torch.randn(c, generator=torch.Generator().manual_seed(2), dtype=F64)
    probes = torch.zeros(n, 1, c, n, dtype=F64)
    probes[torch.arange(n), 0, :, torch.arange(n)] = weights
    (grad,) = torch.autograd.grad(out, x, probes.reshape(n, 1, c, h, w), is_grads_batched=True)
    return grad[:, 0].abs().sum(1).flatten(1) > 0


def _groups(h: int, w: int, ph: int, pw: int) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    long_range = ((i % ph) * pw + j % pw).flatten()  # same offset inside every block
    short_range = ((i // ph) * (w // pw) + j // pw).flatten()  # same block
    return long_range, short_range


def _dense_reference(block, x: torch.Tensor) -> torch.Tensor:
    ph, pw = block.down_factor
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % ph, (-w) % pw
    top, left = pad_h // 2, pad_w // 2
    xp = F.pad(x, (left, pad_w - left, top, pad_h - top))
    long_range, short_range = _groups(*xp.shape[-2:], ph, pw)
    y = _dense_masked_step(block.global_relation, xp, long_range)
    y = _dense_masked_step(block.local_relation, y, short_range)
    y = y[..., top : top + h, left : left + w]
    return x + block.out_proj(y)


@pytest.mark.parametrize(
    "size, down", [((8, 8), (2, 2)), ((8, 12), (2, 4)), ((7, 10), (4, 3)), ((3, 2), (8, 8))]
)
def test_isa_matches_dense_attention_with_group_mask(size, down):
    block = build("isa", 8, down_factor=down, dtype=F64).eval()
    _randomise_bn_(block)
    x = feature_map(2, 8, *size).to(F64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _dense_reference(block, x), atol=1e-10, rtol=0)


def test_isa_float32_matches_float64_reference():
    block = build("isa", 16, down_factor=(2, 3)).eval()
    _randomise_bn_(block)
    x = feature_map(2, 16, 6, 7)
    with torch.no_grad():
        out = block(x)
        ref = _dense_reference(block.to(F64), x.to(F64))
    torch.testing.assert_close(out.to(F64), ref, atol=1e-5, rtol=0)


def test_isa_each_step_sparse_both_steps_dense():
    h = w = 8
    block = build("isa", 4, down_factor=(2, 2), dtype=F64).eval()
    _randomise_bn_(block)
    long_range, short_range = _groups(h, w, 2, 2)
    support_long = _support(block.long_range, 4, h, w)
    support_short = _support(block.short_range, 4, h, w)
    support_both = _support(block, 4, h, w)
    # Each step reaches exactly its group (16 of 64 pixels long-range, 4 of 64 short-range) ...
    assert torch.equal(support_long, long_range[:, None] == long_range[None, :])
    assert torch.equal(support_short, short_range[:, None] == short_range[None, :])
    assert support_long.sum(1).eq(16).all() and support_short.sum(1).eq(4).all()
    # ... and their composition reaches every pixel.
    assert support_both.all()


def test_isa_both_steps_dense_with_padding():
    block = build("isa", 4, down_factor=(2, 3), dtype=F64).eval()
    support = _support(block, 4, 5, 7)
    assert support.all()


def test_isa_mmseg_layout():
    # decode_head.{global,local}_relation.* of mmseg's ISAHead (channels 512, isa_channels 256).
    block = visattn.create_attn("isa", 512)
    assert block.down_factor == (8, 8)
    state = block.state_dict()
    expected = {}
    for rel in ("global_relation", "local_relation"):
        for proj in ("key_project", "query_project"):
            for i, cin in ((0, 512), (1, 256)):
                expected[f"{rel}.{proj}.{i}.conv.weight"] = (256, cin, 1, 1)
                expected[f"{rel}.{proj}.{i}.bn.weight"] = (256,)
                expected[f"{rel}.{proj}.{i}.bn.bias"] = (256,)
        expected[f"{rel}.value_project.weight"] = (512, 512, 1, 1)
        expected[f"{rel}.value_project.bias"] = (512,)
        expected[f"{rel}.output_project.conv.weight"] = (512, 512, 1, 1)
        expected[f"{rel}.output_project.bn.weight"] = (512,)
        expected[f"{rel}.output_project.bn.bias"] = (512,)
    assert {k: tuple(state[k].shape) for k in expected} == expected
    params = {k for k, _ in block.named_parameters()}
    assert params - set(expected) == {"out_proj.weight", "out_proj.bias"}


@pytest.mark.parametrize(
    "kwargs", [{"down_factor": 0}, {"down_factor": (2, 0)}, {"down_factor": (2, 2, 2)}, {"qk_channels": 0}]
)
def test_isa_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^isa: "):
        visattn.create_attn("isa", 16, **kwargs)


@pytest.mark.parametrize("size", [(1, 1), (5, 5), (13, 9), (16, 16)])
def test_isa_export_path_equals_eager(monkeypatch, size):
    # Exported, the group counts are read back from tensors, the map is always padded and the crop is a
    # negative pad: the same numbers.
    block = build("isa", 16, down_factor=(4, 8)).eval()
    _randomise_bn_(block)
    x = feature_map(2, 16, *size)
    with torch.no_grad():
        eager = block(x)
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
        torch.testing.assert_close(block(x), eager, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_isa_onnx_dynamic_hw_matches_eager(tmp_path):
    pytest.importorskip("onnxruntime")
    from visattn import export

    block = export._perturbed("isa", 32)
    path = export.export_onnx(block, torch.randn(2, 32, 16, 20), tmp_path / "isa.onnx", dynamic=True)
    for size in [(1, 1), (5, 5), (8, 8), (9, 17), (13, 9)]:  # one group per axis, and exact multiples
        assert export.onnx_max_error(path, block, torch.randn(2, 32, *size)) <= 1e-4, size
