"""visattn's segmentors against mmsegmentation's own code (optional: skipped when mmseg is absent).

mmsegmentation 1.2.2 imports ``mmcv.ops``, whose compiled extension does not build on current torch.
Before mmseg is imported, ``sys.modules["mmcv.ops"]`` gets a stand-in: the pure-PyTorch
``CrissCrossAttention`` loaded from mmcv-lite's own ``mmcv/ops/cc_attention.py`` and inert placeholders
for the other names mmseg imports. mmseg's base configs (``_base_/models/<name>_r50-d8.py``, SyncBN ->
BN) are then built with random weights and random BN statistics, converted with ``convert_mmseg`` and
loaded strictly into visattn's model of the same zoo name; the logits must agree.

Install: ``pip install mmengine==0.10.7 mmcv-lite==2.1.0 mmsegmentation==1.2.2 ftfy regex``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest
import torch

from visattn.models import convert_mmseg, create_segmentor, to_mmseg

METHODS = ["ccnet", "emanet", "gcnet", "isanet", "nonlocal", "dnl", "danet", "fcn"]


def _stub_mmcv_ops() -> None:
    import mmcv

    try:
        import mmcv.ops  # noqa: F401  (a full mmcv with compiled ops needs no stand-in)

        return
    except Exception:  # noqa: BLE001 - mmcv-lite: no compiled extension
        for name in [n for n in sys.modules if n == "mmcv.ops" or n.startswith("mmcv.ops.")]:
            del sys.modules[name]
    ops_dir = os.path.join(os.path.dirname(mmcv.__file__), "ops")
    stub = types.ModuleType("mmcv.ops")
    stub.__path__ = []

    def placeholder(name: str) -> type:
        def init(self, *args, **kwargs):
            raise RuntimeError(f"mmcv.ops.{name} is a test placeholder (mmcv-lite has no compiled ops)")

        return type(name, (torch.nn.Module,), {"__init__": init})

    def module_getattr(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return placeholder(name)

    stub.__getattr__ = module_getattr
    sys.modules["mmcv.ops"] = stub
    mmcv.ops = stub
    spec = importlib.util.spec_from_file_location(
        "mmcv.ops.cc_attention", os.path.join(ops_dir, "cc_attention.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["mmcv.ops.cc_attention"] = module
    spec.loader.exec_module(module)
    stub.CrissCrossAttention = module.CrissCrossAttention


def _import_mmseg():
    try:
        import mmcv  # noqa: F401
        import mmengine  # noqa: F401
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"mmcv/mmengine not installed ({err})")
    try:
        _stub_mmcv_ops()
        import mmseg
        import mmseg.models  # noqa: F401
        from mmseg.registry import MODELS
        from mmseg.utils import register_all_modules
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"mmsegmentation not importable ({type(err).__name__}: {err})")
    register_all_modules()
    return mmseg, MODELS


@pytest.fixture(scope="module")
def mm():
    return _import_mmseg()


def _config(mmseg, name: str):
    from mmengine.config import Config

    path = os.path.join(
        os.path.dirname(mmseg.__file__), ".mim", "configs", "_base_", "models", f"{name}_r50-d8.py"
    )
    if not os.path.isfile(path):
        pytest.skip(f"mmseg config {path} not found")
    cfg = Config.fromfile(path).model
    cfg.pretrained = None
    cfg.pop("data_preprocessor", None)
    for part in ("backbone", "decode_head", "auxiliary_head"):
        cfg[part]["norm_cfg"] = dict(type="BN", requires_grad=True)
    return cfg


@torch.no_grad()
def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random values for everything a zero/one init would hide: BN affine and statistics, biases, scales."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            continue
        if name.endswith("weight") or name.endswith("scale"):
            p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.4)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(torch.randn(b.shape, generator=g) * 0.2)
        elif name.endswith("running_var"):
            b.copy_(torch.rand(b.shape, generator=g) + 0.5)


def _ours_from_mmseg(mm_model, name: str):
    ours = create_segmentor(f"{name}_r50-d8_cityscapes-512x1024").eval()
    converted = convert_mmseg(mm_model.state_dict())
    ours.load_state_dict(converted, strict=True)
    return ours, converted


def _check(mm, name: str, size: tuple[int, int]) -> None:
    mmseg, MODELS = mm
    torch.manual_seed(0)
    mm_model = MODELS.build(_config(mmseg, name)).eval()
    _randomize_(mm_model, seed=1)
    ours, converted = _ours_from_mmseg(mm_model, name)
    # The inverse mapping reproduces mmseg's keys exactly.
    back = to_mmseg(ours.state_dict())
    assert set(back) == set(mm_model.state_dict())
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = mm_model.encode_decode(x, [dict(img_shape=size, ori_shape=size)])
        out = ours(x)
    assert out.shape == ref.shape == (1, 19, *size)
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), f"{name}: max |ours - mmseg| = {err:.3g} (logit scale {scale:.3g})"


def test_every_key_maps_for_every_method(mm):
    """Build mmseg's seven attention models and FCN, convert, load strictly into visattn (no forward)."""
    mmseg, MODELS = mm
    for name in METHODS:
        with torch.device("meta"):
            mm_model = MODELS.build(_config(mmseg, name))
            ours = create_segmentor(f"{name}_r50-d8_cityscapes-512x1024")
        mm_state = mm_model.state_dict()
        converted = convert_mmseg(mm_state)
        ours_state = ours.state_dict()
        assert set(converted) == set(ours_state), name
        for key, value in converted.items():
            assert value.shape == ours_state[key].shape, (name, key)
        assert set(to_mmseg(ours_state)) == set(mm_state), name


def test_logits_equal_ccnet(mm):
    _check(mm, "ccnet", (40, 48))


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_logits_equal(mm, name):
    _check(mm, name, (72, 56))
