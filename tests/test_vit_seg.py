"""Segmentation on ViTs (issue 17, item 5): ``create_segmentor`` with a timm ViT backbone, any ViT mixer, the
simple feature pyramid (visattn.models.vit_backbone) and any head; end to end through visattn.engine.train.

A tiny ViT (embed 64, 2 blocks, 2 heads, 64 px) from timm's own ``vit_small_patch16_224`` entry point keeps
this file fast; one test builds the real ViT-S/16 shapes.
"""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

import visattn
from visattn.engine import ConfigError, load_config
from visattn.engine.trainer import train
from visattn.models.vit import ViTMixer
from visattn.models.vit_backbone import ViTFeatures

NAME = "vit_small_patch16_224"
TINY_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 64}
NARROW = {"head_kwargs": {"channels": 16}, "aux_kwargs": {"channels": 16}, "neck_kwargs": {"channels": 16}}


def _cfg(mixer=None, head="fcn", **extra):
    cfg = {"backbone": NAME, "backbone_attn": mixer, "backbone_kwargs": dict(TINY_VIT), "head": head}
    cfg.update(num_classes=3, **NARROW)
    cfg.update(extra)
    return cfg


def _seg(mixer=None, head="fcn", seed=0, **extra):
    torch.manual_seed(seed)
    return visattn.create_segmentor(_cfg(mixer, head, **extra))


def _peaked_(model: torch.nn.Module) -> torch.nn.Module:
    """Unit-gain ViT weights with scaled-up q/k rows, so that attention is far from uniform and the mixer
    visibly matters (timm's 0.02-std init makes every attention branch negligible)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.backbone.vit.named_parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5, generator=g)
                if name.endswith("attn.qkv.weight"):
                    p[: 2 * p.shape[1]] *= 2.0
    return model


X = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
# No multiple of the 16-pixel patch: patch padding and the crop back to the image's cells are exercised.
X_ODD = torch.randn(1, 3, 50, 70, generator=torch.Generator().manual_seed(1))


# Settings under which every new parameter of the method is used on the 4 x 6 patch grid of X (at the
# defaults, sinkhorn's one 8-patch window needs no sort and compressive's two bands no compressed memory).
SMALL_GRID = {
    "sinkhorn": {"window_size": 2},
    "compressive": {"band_rows": 1, "mem_rows": 1, "cmem_rows": 1, "compression": 2},
}


@pytest.mark.parametrize("attn", [None, *visattn.list_attns(vit=True)])
def test_every_mixer_segments_forward_backward(attn):
    extra = {"backbone_attn_kwargs": SMALL_GRID[attn]} if attn in SMALL_GRID else {}
    model = _seg(attn, **extra).train()
    assert sum(isinstance(m, ViTMixer) for m in model.modules()) == (0 if attn is None else 2)
    out = model(X)
    assert set(out) == {"out", "aux"} and all(v.shape == (2, 3, 64, 96) for v in out.values())
    loss, _ = model.loss(out, torch.randint(0, 3, (2, 64, 96), generator=torch.Generator().manual_seed(2)))
    loss.backward()
    # The ViT is pruned to the blocks read and has no classifier: every parameter is trained.
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []
    model.eval()
    with torch.no_grad():
        logits = model(X_ODD)
    assert logits.shape == (1, 3, 50, 70) and torch.isfinite(logits).all()


@pytest.mark.parametrize("head", ["ccnet", "danet", "emanet", "gcnet", "isanet", "nonlocal", "dnl", "attn"])
def test_any_head_on_a_vit_mixer(head):
    extra = {"attn": "efficient_attention"} if head == "attn" else {}
    if head == "danet":
        extra["head_kwargs"] = {"channels": 16}
    model = _seg("performer", head, **extra).train()
    out = model(X)
    assert out["out"].shape == (2, 3, 64, 96)
    sum(v.float().mean() for v in out.values()).backward()
    model.eval()
    with torch.no_grad():
        assert model(X_ODD).shape == (1, 3, 50, 70)


def test_mixers_see_the_padded_patch_grid_and_features_cover_the_image():
    model = _seg("axial").eval()
    with torch.no_grad():
        feats = model.extract_features(X_ODD)
    grids = {m._grid_ctx.grid for m in model.modules() if isinstance(m, ViTMixer)}
    assert grids == {(4, 5)}  # ceil(50 / 16) x ceil(70 / 16) patches after padding
    # stride 8: the 8 x 10 cells of the padded grid cropped to the ceil(50 / 8) x ceil(70 / 8) over the image
    assert [tuple(f.shape) for f in feats] == [(1, 16, 7, 9), (1, 16, 7, 9)]
    assert model.backbone.feature_info.channels() == [16, 16]
    assert model.backbone.feature_info.reduction() == [8, 8]
    assert [e["block"] for e in model.backbone.feature_info.info] == [0, 1]  # aux: middle, decode: last


@pytest.mark.parametrize("stride, deconvs, pools", [(8, 1, 0), (16, 0, 0), (32, 0, 1), (None, 0, 0)])
def test_output_stride_picks_the_pyramid_level(stride, deconvs, pools):
    model = _seg(output_stride=stride, aux=False).eval()
    s = stride or 16
    with torch.no_grad():
        feats = model.extract_features(X)
    assert [tuple(f.shape) for f in feats] == [(2, 16, math.ceil(64 / s), math.ceil(96 / s))]
    (branch,) = model.backbone.neck
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in branch) == deconvs
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in branch) == pools
    assert model.auxiliary_head is None and set(model.train()(X)) == {"out"}


def test_full_vitdet_pyramid_from_the_last_block():
    vit = visattn.create_model(NAME, "longformer", num_classes=0, dynamic_img_size=True, **TINY_VIT)
    feats = ViTFeatures(vit, [(-1, 4), (-1, 8), (-1, 16), (-1, 32)], channels=8).eval()
    with torch.no_grad():
        maps = feats(X)
    assert [tuple(m.shape) for m in maps] == [(2, 8, 16, 24), (2, 8, 8, 12), (2, 8, 4, 6), (2, 8, 2, 3)]
    assert feats.take == [1] and feats.feature_info.reduction() == [4, 8, 16, 32]
    convt = [sum(isinstance(m, torch.nn.ConvTranspose2d) for m in b) for b in feats.neck]
    assert convt == [2, 1, 0, 0]
    assert isinstance(vit.norm, torch.nn.Identity) and vit.num_classes == 0  # pruned: unused otherwise


def test_dense_limit_mixer_equals_timm_dense_attention_in_the_segmentor():
    dense = _peaked_(_seg(None)).eval()
    mixer = _seg("nonlocal").eval()
    mixer.load_state_dict(dense.state_dict(), strict=True)  # the mixer keeps timm's parameter names
    approx = _seg("performer").eval()
    approx.load_state_dict(dense.state_dict(), strict=True)
    with torch.no_grad():
        ref = dense(X)
        assert (mixer(X) - ref).abs().max() <= 1e-5
        assert (approx(X) - ref).abs().max() > 1e-3  # the mixer really runs


@pytest.fixture(scope="module")
def tiny_vit_file(tmp_path_factory):
    torch.manual_seed(3)
    state = timm.create_model(NAME, **TINY_VIT).state_dict()
    path = tmp_path_factory.mktemp("vitseg") / "tiny_vit.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path, state


def test_backbone_pretrained_loads_timm_weights_into_the_mixer(tiny_vit_file):
    path, state = tiny_vit_file
    kwargs = {**TINY_VIT, "pretrained_cfg_overlay": {"file": str(path)}}
    model = _seg("nystrom", backbone_kwargs=kwargs, backbone_pretrained=True)
    vit_state = model.backbone.vit.state_dict()
    # Everything but the pruned final norm and classifier, under timm's names, equal to the file.
    assert set(vit_state) == {k for k in state if not k.startswith(("norm.", "head."))}
    assert all(torch.equal(vit_state[k], state[k]) for k in vit_state)


def test_vit_segmentor_round_trips_through_local_dir(tmp_path):
    model = _peaked_(_seg("isa", backbone_attn_kwargs={"down_factor": 2})).eval()
    model.save_pretrained(tmp_path / "saved")
    loaded = visattn.create_segmentor(f"local-dir:{tmp_path / 'saved'}").eval()
    assert loaded.config["neck_kwargs"] == {"channels": 16}
    with torch.no_grad():
        assert torch.equal(loaded(X_ODD), model(X_ODD))


def test_real_vit_small_shapes():
    model = visattn.create_segmentor(
        {"backbone": NAME, "backbone_attn": "performer", "head": "fcn", "num_classes": 19}
    ).eval()
    vit = model.backbone.vit
    assert len(vit.blocks) == 12 and vit.embed_dim == 384
    assert [e["block"] for e in model.backbone.feature_info.info] == [5, 11]
    assert model.backbone.feature_info.channels() == [256, 256]  # ViTDet's width
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 160)).shape == (1, 19, 224, 160)


@pytest.mark.parametrize(
    "cfg, needle",
    [
        (_cfg("cbam"), "cbam cannot be a ViT attention"),
        (_cfg("performer", backbone_attn_kwargs={"redraw_interval": 3}), "performer as a ViT attention"),
        (_cfg(neck_kwargs={"chanels": 8}), "neck_kwargs.chanels"),
        (_cfg(neck_kwargs={"aux_block": 2}), "neck_kwargs.aux_block' must be a block index"),
        (_cfg(backbone_kwargs={**TINY_VIT, "output_stride": 8}), "backbone_kwargs.output_stride"),
        (_cfg(backbone_pretrained="open-mmlab://resnet50_v1c"), "use true (timm's weights) or false"),
        ({"backbone": "resnet18", "head": "fcn", "neck_kwargs": {"channels": 8}}, "remove it"),
        (
            _cfg(backbone="vit_small_patch14_dinov2", backbone_kwargs={**TINY_VIT, "img_size": 56}),
            "stride 8 is not a power-of-two multiple or fraction of the patch size 14",
        ),
        (_cfg(backbone="swin_tiny_patch4_window7_224", backbone_kwargs={}), "no attn_layer hook"),
    ],
)
def test_refusals_name_the_key_and_the_fix(cfg, needle):
    with pytest.raises(ValueError) as err:
        visattn.create_segmentor(cfg)
    assert needle in str(err.value)


def test_unknown_neck_key_is_a_config_error():
    with pytest.raises(ConfigError, match="neck_kwargs.chanels"):
        visattn.create_segmentor(_cfg(neck_kwargs={"chanels": 8}))


def test_training_a_vit_mixer_segmentor_lowers_the_loss(tmp_path):
    sets = [
        f"model.backbone={NAME}",
        "model.backbone_kwargs={embed_dim: 64, depth: 2, num_heads: 2, img_size: 64}",
        "model.backbone_attn=performer",
        "model.neck_kwargs={channels: 32}",
        "model.head=fcn",
        "model.attn=null",
        "model.attn_kwargs={}",
        "model.head_kwargs={channels: 32}",
        "model.aux_kwargs={channels: 32}",
        "data.synthetic={train_length: 64, val_length: 4, size: [64, 64]}",
        "data.crop_size=[64, 64]",
        "train.batch_size=4",
        "train.iters=30",
        "train.log_interval=1",
        "train.ckpt_interval=1000",
        "train.deterministic=true",
        "eval.max_images=2",
        "optim.lr=0.003",
        "sched.warmup_iters=0",
        f"train.work_dir={tmp_path / 'run'}",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = train(load_config(None, sets), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert 0.0 <= metrics["mIoU"] <= 100.0
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    losses = [json.loads(x)["loss"] for x in lines if '"loss"' in x]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses


# -- registered ViT names (issue 17, item 6) -------------------------------------------------------------
TINY_ARCH = {"embed_dim": 64, "depth": 2, "num_heads": 2}
VIT_NAMES = [
    "visattn_vit_base_patch16_384_performer",
    "visattn_vit_small_patch16_384_longformer",
    "visattn_vit_small_patch16_384_nystrom",
    "visattn_vit_small_patch16_384_performer",
]


def test_vit_names_are_registered():
    from visattn.models.timm_registry import registered_model_names

    assert timm.list_models("visattn_vit_*") == VIT_NAMES
    assert set(VIT_NAMES) <= set(registered_model_names())
    model = timm.create_model("visattn_vit_small_patch16_384_nystrom")
    assert sum(isinstance(m, ViTMixer) and m.method == "nystrom" for m in model.modules()) == 12
    assert model.pretrained_cfg["architecture"] == "visattn_vit_small_patch16_384_nystrom"
    assert model.pretrained_cfg["input_size"] == (3, 384, 384)


@pytest.mark.parametrize("name", VIT_NAMES)
def test_registered_vit_round_trips_through_save_for_hf(name, tmp_path):
    from timm.models import save_for_hf

    attn_kwargs = {"num_features": 16, "seed": 3} if name.endswith("performer") else None
    model = _vit_peaked_(timm.create_model(name, num_classes=5, attn_kwargs=attn_kwargs, **TINY_ARCH)).eval()
    save_for_hf(model, tmp_path)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert loaded.pretrained_cfg["architecture"] == name
    # The method's keywords travel in config.json (they change the function, not the weights).
    assert repr(loaded.blocks[0].attn) == repr(model.blocks[0].attn)
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _vit_peaked_(vit: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in vit.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5, generator=g)
    return vit


def test_registered_vit_loads_timm_weights_resampled_to_384(tmp_path):
    """A 224-pixel timm checkpoint into the 384-pixel name: timm's checkpoint filter resamples the position
    embeddings as for timm's own model, and with Nystrom at its dense limit the logits equal timm's dense ViT."""
    torch.manual_seed(4)
    src = _vit_peaked_(timm.create_model(NAME, **TINY_ARCH))
    path = tmp_path / "vit224.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    overlay = {"file": str(path)}
    dense = timm.create_model(
        "vit_small_patch16_384", pretrained=True, pretrained_cfg_overlay=overlay, **TINY_ARCH
    ).eval()
    model = timm.create_model(
        "visattn_vit_small_patch16_384_nystrom",
        pretrained=True,
        pretrained_cfg_overlay=overlay,
        attn_kwargs={"landmarks": (24, 24), "pinv_iterations": None},
        **TINY_ARCH,
    ).eval()
    x = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = dense(x)
        assert (model(x) - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert model.pos_embed.shape == (1, 577, 64)


def test_registered_vit_features_only():
    model = timm.create_model(
        "visattn_vit_small_patch16_384_longformer", features_only=True, out_indices=(0, 1), **TINY_ARCH
    ).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 208, 304))  # dynamic size: 13 x 19 patches
    assert [tuple(f.shape) for f in feats] == [(1, 64, 13, 19), (1, 64, 13, 19)]


def test_vit_speed_tool_writes_the_table(tmp_path):
    """tools/vit_speed.py end to end on a one-block ViT at 64 px (the committed table is its full run)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "vit_speed.py"
    spec = importlib.util.spec_from_file_location("vit_speed_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "docs" / "speed.md"
    args = ["--sizes", "64:1", "--repeats", "1", "--warmup", "0", "--mixers", "performer", "nonlocal"]
    assert tool.main([*args, "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ")]
    assert rows[0] == "| mixer | 64 px (16 tokens), 1 block(s): ms (x dense) | MiB |"
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| dense", "| performer", "| nonlocal"]
    assert "(1.00)" in rows[1] and "Reduced depth (64 px: 1 of 12 blocks)" in out.read_text()
    assert [p.name for p in out.parent.iterdir()] == ["speed.md"]  # no temporary file left
    with pytest.raises(SystemExit):
        tool.main(["--mixers", "cbam", "--out", str(out)])
