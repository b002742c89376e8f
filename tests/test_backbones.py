"""visattn.create_model: attention inside timm backbones without breaking timm."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import perturb_

import visattn
from visattn.models import registered_model_names

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
X_SMALL = X[:1, :, :32, :32]
IDENTITY = [n for n in visattn.list_attns() if visattn.attn_info(n).identity_init]


def count(model, name):
    return sum(getattr(type(m), "attn_name", "") == name for m in model.modules())


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", num_classes=10)
    perturb_(plain, seed=3, scale=0.02)  # weights unlike any init, so loading them is visible
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(plain.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def plain_output(resnet18_file):
    plain = timm.create_model(
        "resnet18",
        num_classes=10,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(resnet18_file), num_classes=10),
    ).eval()
    with torch.no_grad():
        return plain(X_SMALL)


@pytest.mark.parametrize("name", IDENTITY)
def test_identity_blocks_keep_pretrained_output(name, resnet18_file, plain_output):
    model = visattn.create_model(
        "resnet18",
        name,
        num_classes=10,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(resnet18_file), num_classes=10),
    ).eval()
    assert count(model, name) == 4  # two BasicBlocks in each of the last two stages
    with torch.no_grad():
        assert (model(X_SMALL) - plain_output).abs().max().item() <= 1e-5
        for m in model.modules():
            if getattr(type(m), "attn_name", "") == name:
                perturb_(m, seed=1)
        assert (
            model(X_SMALL) - plain_output
        ).abs().max().item() > 1e-4  # the inserted blocks are really on the path


FAMILIES = {
    "block": ["resnet18", "regnetx_002", "efficientnet_lite0", "gernet_s"],
    "stage": [
        "resnet18",
        "convnext_atto",
        "efficientnet_b0",
        "regnety_002",
        "mobilenetv3_small_050",
        "resnetv2_50",
    ],
}


@pytest.mark.parametrize(
    "placement,backbone", [(p, b) for p, bs in FAMILIES.items() for b in bs], ids=lambda v: str(v)
)
def test_placement_forward_backward(placement, backbone):
    model = visattn.create_model(backbone, "gcnet", placement=placement, num_classes=4)
    n = count(model, "gcnet")
    assert n == 2 if placement == "stage" else n >= 2
    out = model(X[:, :, :32, :32])
    out.sum().backward()
    assert out.shape == (2, 4)
    for m in model.modules():
        if getattr(type(m), "attn_name", "") == "gcnet":
            assert all(p.grad is not None for p in m.parameters())


def test_block_placement_without_slot_says_how_to_fix():
    with pytest.raises(ValueError, match="placement='stage'"):
        visattn.create_model("convnext_atto", "ccnet", placement="block")


def test_stage_selection_and_errors():
    model = visattn.create_model("resnet18", "ccnet", stages=[2])
    assert [n for n, m in model.named_modules() if getattr(type(m), "attn_name", "")] == [
        "layer2.0.se",
        "layer2.1.se",
    ]
    with pytest.raises(ValueError, match=r"valid stages: 0: act1"):
        visattn.create_model("resnet18", "ccnet", stages=[7])
    with pytest.raises(ValueError, match="did you mean 'ccnet'"):
        visattn.create_model("resnet18", "ccnte")
    with pytest.raises(ValueError, match="Did you mean resnet18"):
        visattn.create_model("resnet18x", "ccnet")
    with pytest.raises(ValueError, match="placement"):
        visattn.create_model("resnet18", "ccnet", placement="everywhere")
    assert count(visattn.create_model("resnet18"), "ccnet") == 0


@pytest.mark.parametrize("placement", ["block", "stage"])
def test_features_only_output_stride_8(placement):
    torch.manual_seed(0)
    model = visattn.create_model(
        "resnet18",
        "ccnet",
        placement=placement,
        features_only=True,
        output_stride=8,
        out_indices=(1, 2, 3, 4),
    ).eval()
    plain = timm.create_model(
        "resnet18", features_only=True, output_stride=8, out_indices=(1, 2, 3, 4)
    ).eval()
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "se." not in k and "visattn_attn" not in k}
    )
    with torch.no_grad():
        feats = model(X)
        assert [tuple(f.shape) for f in feats] == [
            (2, 64, 16, 16),
            (2, 128, 8, 8),
            (2, 256, 8, 8),
            (2, 512, 8, 8),
        ]
        for m in model.modules():
            if getattr(type(m), "attn_name", "") == "ccnet":
                perturb_(m, seed=2)
        ref = plain(X)
        changed = [not torch.allclose(a, b) for a, b in zip(model(X), ref)]
    assert changed == [False, False, True, True]  # attention sits in stages 3 and 4 only


def test_timm_features_keep_working():
    model = visattn.create_model("resnet18", "axial", num_classes=7).eval()
    assert model.forward_features(X).shape == (2, 512, 2, 2)
    model.reset_classifier(3)
    assert model(X_SMALL).shape == (1, 3)
    model.set_grad_checkpointing(True)
    model.train()
    model(X[:, :, :32, :32]).sum().backward()
    model.eval()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(X_SMALL), model(X_SMALL))


@pytest.mark.parametrize("name", ["visattn_resnet50_ccnet", "visattn_resnet50_gcnet"])
def test_registered_model_round_trips_through_save_for_hf(name, tmp_path):
    from timm.models import save_for_hf

    assert name in registered_model_names() and name in timm.list_models("visattn_*")
    model = timm.create_model(name, num_classes=5)
    perturb_(model, seed=4, scale=0.01).eval()
    save_for_hf(model, tmp_path)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert loaded.pretrained_cfg["architecture"] == name
    with torch.no_grad():
        torch.testing.assert_close(loaded(X_SMALL), model(X_SMALL), atol=0, rtol=0)


def test_registered_model_loads_backbone_weights_and_keeps_attention_init(tmp_path):
    torch.manual_seed(0)
    plain = timm.create_model("resnet50", num_classes=10)
    perturb_(plain, seed=5, scale=0.01)
    path = tmp_path / "r50.pth"
    torch.save(plain.state_dict(), path)
    model = timm.create_model(
        "visattn_resnet50_gcnet",
        pretrained=True,
        num_classes=10,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X_SMALL), plain.eval()(X_SMALL), atol=1e-5, rtol=1e-5)


def test_smp_uses_registered_model_as_encoder():
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.Unet("tu-visattn_resnet50_gcnet", encoder_weights=None, classes=3).eval()
    assert count(model, "gcnet") == 9
    with torch.no_grad():
        assert model(X_SMALL).shape == (1, 3, 32, 32)
