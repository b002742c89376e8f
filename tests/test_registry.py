import dataclasses
import functools

import pytest
import timm
import torch

import visattn
from visattn.layers import AttnBlock
from visattn.registry import _REGISTRY

INFO = dict(
    title="t",
    arxiv="2001.00001",
    year=2020,
    family="gate",
    complexity="O(N)",
    flops_exponent=1.0,
    native_2d=True,
    causal=False,
    identity_init=False,
    idea="i",
)


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean 'ccnet'"):
        visattn.create_attn("ccnte", 16)


def test_unknown_keyword_names_the_block():
    with pytest.raises(TypeError, match=r"ccnet .*'heads'"):
        visattn.create_attn("ccnet", 16, heads=2)


def test_causal_keyword_refused_by_non_causal_block():
    with pytest.raises(TypeError, match="cbam"):
        visattn.create_attn("cbam", 16, causal=True)


def test_list_filters():
    names = visattn.list_attns()
    assert names == sorted(names)
    assert {"nonlocal", "cbam", "gcnet", "ccnet", "axial"} <= set(names)
    assert all(visattn.attn_info(n).causal for n in visattn.list_attns(causal=True))
    assert "axial" in visattn.list_attns(causal=True)
    assert visattn.list_attns("c*") == [n for n in names if n.startswith("c")]
    assert all(not visattn.attn_info(n).native_2d for n in visattn.list_attns(native_2d=False))


def test_info_is_frozen_and_complete():
    info = visattn.attn_info("ccnet")
    assert info.name == "ccnet" and info.arxiv == "1811.11721" and info.flops_exponent == 1.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.year = 1999


def test_register_twice_is_an_error():
    with pytest.raises(ValueError, match="already registered"):

        @visattn.register_attn("cbam", **INFO)
        class Again(AttnBlock):
            def __init__(self, channels, *, device=None, dtype=None):
                super().__init__(channels)


def test_register_checks_constructor_and_info():
    with pytest.raises(TypeError, match="channels"):

        @visattn.register_attn("tmp_bad_ctor", **INFO)
        class NoChannels(AttnBlock):
            def __init__(self, dim, *, device=None, dtype=None):
                super().__init__(dim)

    with pytest.raises(TypeError, match="causal"):

        @visattn.register_attn("tmp_bad_causal", **{**INFO, "causal": True})
        class NoCausal(AttnBlock):
            def __init__(self, channels, *, device=None, dtype=None):
                super().__init__(channels)

    with pytest.raises(ValueError, match="family"):
        visattn.register_attn("tmp_bad_family", **{**INFO, "family": "magic"})
    with pytest.raises(ValueError, match="needs an export_note"):
        visattn.register_attn("tmp_no_note", **{**INFO, "exportable": False})
    with pytest.raises(ValueError, match="needs an export_note"):
        visattn.register_attn("tmp_no_note", **{**INFO, "export_dynamic_hw": False, "export_note": " "})
    with pytest.raises(TypeError, match="unknown AttnInfo field"):
        visattn.register_attn("tmp_bad_field", **INFO, speed="fast")
    with pytest.raises(ValueError, match="random_in_training must be a bool"):
        visattn.register_attn("tmp_bad_random", **INFO, random_in_training="yes")
    for prefixes in ("qkv.", ("qkv.", ""), ["qkv."]):
        with pytest.raises(ValueError, match="surrogate_gradient_exact must be a tuple"):
            visattn.register_attn("tmp_bad_surrogate", **INFO, surrogate_gradient_exact=prefixes)
    assert not any(n.startswith("tmp_") for n in _REGISTRY)


@pytest.mark.parametrize("name", ["nonlocal", "cbam", "gcnet", "ccnet", "axial"])
def test_timm_attn_layer(name):
    """timm >= 1.0.21 calls attn_layer(channels, device=..., dtype=...) inside every residual block."""
    attn_layer = functools.partial(visattn.create_attn, name)
    model = timm.create_model("resnet18", num_classes=10, block_args=dict(attn_layer=attn_layer)).eval()
    blocks = [m for m in model.modules() if getattr(type(m), "attn_name", None) == name]
    assert len(blocks) == 8  # one per BasicBlock
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 10) and torch.isfinite(out).all()
