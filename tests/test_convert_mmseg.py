"""mmsegmentation checkpoint conversion: key layout against mmseg's, round trips, strict loading, the tool."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from test_segmentor import randomize_

from visattn.models import convert_mmseg, create_segmentor, to_mmseg
from visattn.models.convert import (
    ConversionError,
    load_mmseg_state_dict,
    load_state_dict_strict,
    load_torch_checkpoint,
)

ROOT = Path(__file__).resolve().parent.parent
KEYS_FILE = Path(__file__).parent / "data" / "mmseg_state_dict_keys.txt"  # copy of shared/reference
METHODS = ["ccnet", "emanet", "gcnet", "isanet", "nonlocal", "dnl", "danet", "fcn"]
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _reference_layouts() -> dict[str, dict]:
    """mmseg_state_dict_keys.txt: per method, total/backbone key counts, head numel and listed keys/shapes."""
    layouts, current = {}, None
    for line in KEYS_FILE.read_text().splitlines():
        head = re.match(r"===== (\w+): \w+\s+total keys (\d+), backbone keys (\d+), head params (\d+)", line)
        if head:
            current = layouts.setdefault(
                head.group(1),
                {
                    "total": int(head.group(2)),
                    "backbone": int(head.group(3)),
                    "head_numel": int(head.group(4)),
                    "keys": {},
                },
            )
            continue
        key = re.match(r"^\s+((?:decode|auxiliary)_head\.\S+) \(([\d, ]*)\)$", line)
        if key and current is not None:
            current["keys"][key.group(1)] = tuple(
                int(v) for v in key.group(2).replace(" ", "").split(",") if v
            )
    return layouts


def small(method: str, **overrides):
    """A small model with the method's head (deep-stem timm backbone, narrow head) for real forwards."""
    head_kwargs = {"channels": 16}
    head_kwargs.update(
        {
            "emanet": {"ema_channels": 16, "num_bases": 4},
            "isanet": {"isa_channels": 8},
            "danet": {"pam_channels": 4},
        }.get(method, {})
    )
    cfg = {
        "backbone": "resnet10t",
        "head": method,
        "head_kwargs": head_kwargs,
        "aux_kwargs": {"channels": 8},
        "num_classes": 5,
    }
    return create_segmentor({**cfg, **overrides})


@pytest.mark.skipif(not KEYS_FILE.is_file(), reason="reference key list not available")
@pytest.mark.parametrize("method", [m for m in METHODS if m != "fcn"])
def test_r50_layout_is_mmseg_layout(method):
    """Every decode/auxiliary head key mmseg has, with its shape, and nothing else; the key counts."""
    ref = _reference_layouts()[method]
    with torch.device("meta"):
        model = create_segmentor(f"{method}_r50-d8_cityscapes-512x1024")
    mm = to_mmseg(model.state_dict())
    assert len(mm) == ref["total"]
    assert sum(k.startswith("backbone.") for k in mm) == ref["backbone"]
    head_keys = {
        k: tuple(v.shape) for k, v in mm.items() if not k.startswith("backbone.") and not k.endswith(BUFFERS)
    }
    assert head_keys == ref["keys"]
    assert sum(v.numel() for k, v in mm.items() if k.startswith("decode_head.")) == ref["head_numel"]
    stem = {k for k in mm if k.startswith("backbone.stem.")}
    bn = ("weight", "bias") + BUFFERS
    assert stem == {f"backbone.stem.{i}.weight" for i in (0, 3, 6)} | {
        f"backbone.stem.{i}.{p}" for i in (1, 4, 7) for p in bn
    }


@pytest.mark.parametrize(
    "name",
    [
        "fcn_r50-d8_ade20k-512x512",
        "isanet_r101-d8_cityscapes-512x1024",
        "fcn_r101-d8-amp_cityscapes-512x1024",
    ],
)
def test_other_zoo_layouts_round_trip(name):
    with torch.device("meta"):
        model = create_segmentor(name)
    state = model.state_dict()
    mm = to_mmseg(state)
    assert sum(k.startswith("backbone.layer3.") for k in mm) == (23 if "r101" in name else 6) * 18 + 6
    back = convert_mmseg(mm)
    assert set(back) == set(state)
    assert all(back[k].shape == v.shape for k, v in state.items())


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_tensors_and_outputs(method):
    """ours -> mmseg layout -> ours: every tensor identical, and a second model loaded from the
    mmseg-layout checkpoint computes exactly the same logits."""
    torch.manual_seed(0)
    source = randomize_(small(method), seed=1).eval()
    state = source.state_dict()
    mm = to_mmseg(state)
    assert not any(k.startswith("backbone.conv1") or k.startswith("backbone.bn1") for k in mm)
    back = convert_mmseg({"state_dict": mm, "meta": {"CLASSES": ("a", "b")}})
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].shape == value.shape and torch.equal(back[key], value), key
    torch.manual_seed(123)
    target = small(method).eval()
    load_mmseg_state_dict(target, {"state_dict": mm})
    x = torch.randn(1, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), atol=0, rtol=0)


def test_scales_and_gc_names():
    state = small("ccnet").state_dict()
    assert state["decode_head.cca.gamma"].shape == (1,)
    mm = to_mmseg(state)
    assert mm["decode_head.cca.gamma.scale"].shape == ()
    mm_da = to_mmseg(small("danet").state_dict())
    assert (
        mm_da["decode_head.pam.gamma.scale"].shape == () and mm_da["decode_head.cam.gamma.scale"].shape == ()
    )
    mm_gc = to_mmseg(small("gcnet").state_dict())
    assert {"decode_head.gc_block.conv_mask.weight", "decode_head.gc_block.channel_add_conv.1.weight"} <= set(
        mm_gc
    )
    converted = convert_mmseg({"decode_head.cca.gamma.scale": torch.tensor(0.25)})
    assert (
        converted["decode_head.cca.gamma"].shape == (1,) and converted["decode_head.cca.gamma"].item() == 0.25
    )


def test_strict_loading_names_every_problem():
    model = small("fcn")
    mm = to_mmseg(model.state_dict())
    bad = dict(mm)
    del bad["decode_head.conv_cat.conv.weight"]
    bad["decode_head.extra.weight"] = torch.zeros(1)
    bad["decode_head.conv_seg.weight"] = torch.zeros(150, 16, 1, 1)
    with pytest.raises(ConversionError) as err:
        load_mmseg_state_dict(model, bad, source="ckpt.pth")
    msg = str(err.value)
    assert (
        "ckpt.pth" in msg and "decode_head.conv_cat.conv.weight" in msg and "decode_head.extra.weight" in msg
    )
    assert "decode_head.conv_seg.weight: checkpoint (150, 16, 1, 1) vs model (5, 16, 1, 1)" in msg
    with pytest.raises(ConversionError, match="outside backbone"):
        convert_mmseg({"neck.conv.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="not part of"):
        convert_mmseg({"backbone.stem.2.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="not a tensor"):
        convert_mmseg({"state_dict": {"backbone.layer1.0.conv1.weight": [1, 2]}})
    load_state_dict_strict(model, convert_mmseg(mm))  # the unmodified checkpoint loads


class Marker:
    """Stands for metadata classes of real checkpoints; unpickling it must never run its code."""

    built = False

    def __setstate__(self, state):
        Marker.built = True


def _fake_mmseg_checkpoint(path: Path, model) -> None:
    marker = Marker()
    torch.save(
        {
            "meta": {"marker": marker, "seed": 0},
            "state_dict": to_mmseg(model.state_dict()),
            "optimizer": {"state": {}},
        },
        path,
    )


def test_weights_only_loading_never_builds_metadata_classes(tmp_path):
    model = small("nonlocal")
    path = tmp_path / "ckpt.pth"
    _fake_mmseg_checkpoint(path, model)
    Marker.built = False
    loaded = load_torch_checkpoint(str(path))
    assert not Marker.built
    assert type(loaded["meta"]["marker"]).__name__.startswith("Opaque")
    assert set(loaded["state_dict"]) == set(to_mmseg(model.state_dict()))


def test_convert_tool_writes_safetensors_that_load(tmp_path, capsys):
    torch.manual_seed(0)
    source = randomize_(small("gcnet"), seed=2).eval()
    ckpt, out = tmp_path / "gcnet-0123abcd.pth", tmp_path / "gcnet.safetensors"
    _fake_mmseg_checkpoint(ckpt, source)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "backbone: resnet10t\nhead: gcnet\nhead_kwargs: {channels: 16}\naux_kwargs: {channels: 8}\n"
        "num_classes: 5\n"
    )
    tool = _tool()
    assert tool.main([str(ckpt), str(out), "--model", str(cfg)]) == 0
    loaded = create_segmentor(str(cfg), checkpoint_path=str(out)).eval()
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), atol=0, rtol=0)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(cfg.read_text().replace("num_classes: 5", "num_classes: 7"))
    assert tool.main([str(ckpt), str(tmp_path / "x.safetensors"), "--model", str(wrong)]) == 1
    assert "conv_seg.weight" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def _tool():
    spec = importlib.util.spec_from_file_location("convert_mmseg_tool", ROOT / "tools" / "convert_mmseg.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
