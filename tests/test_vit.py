"""Efficient attention as the attention of timm ViTs (visattn.models.vit, issue 17).

Most tests use a tiny ViT (embed 32, 2 blocks, 2 heads, a class and a register token) built from timm's own
``vit_small_patch16_224`` entry point; its "pretrained" weights are a random state dict of timm's dense ViT
in a local file (``pretrained_cfg_overlay=dict(file=...)``: no network). The q/k weights are scaled up so
that attention is far from uniform, otherwise every approximation would look exact.
"""

from __future__ import annotations

import logging

import pytest
import timm
import torch
from helpers import draw_zero_parameters_, fixed_state_function
from safetensors.torch import save_file
from vit_helpers import NAME, TINY, build_vit, random_dense_state

import visattn
from visattn.models.vit import MIXERS, ViTMixer, attach_grid, mixer_class

# A setting with exactly dense attention on every grid used below (at most 14 x 14 patches).
DENSE_LIMIT = {
    "nonlocal": {},
    "longformer": {"kernel_size": 27},
    "isa": {"down_factor": 14},
    "sparse_transformer": {"stride": 196},
    "nystrom": {"landmarks": (14, 14), "pinv_iterations": None},
    "smyrf": {"cluster_size": 196},
    "bigbird": {"block_size": 14},
    "diet": {"kernel_size": 27},
    "gmat": {"kernel_size": 27},
    "informer": {"factor": 1000},
    "scram": {"k": 196},
    "clustered": {"topk": 198},
    "reformer": {"chunk_size": 98},
}


def test_list_attns_vit_is_the_capability_table():
    mixers = visattn.list_attns(vit=True)
    assert mixers == sorted(MIXERS)
    assert len(mixers) == 36
    assert set(visattn.list_attns(vit=False)) == set(visattn.list_attns()) - set(mixers)
    assert "cbam" not in mixers and "gcnet" not in mixers
    assert visattn.list_attns("perf*", vit=True) == ["performer", "performer_v1"]


@pytest.mark.parametrize("attn", sorted(MIXERS))
def test_pretrained_keys_forward_backward(attn, tiny_file, dense, images, caplog):
    with caplog.at_level(logging.INFO, logger="visattn.models.vit"):
        model = build_vit(attn, tiny_file)
    assert isinstance(model, timm.models.VisionTransformer)
    mixers = [m for m in model.modules() if isinstance(m, ViTMixer)]
    assert len(mixers) == 2 and all(m.method == attn for m in mixers)
    # timm's keys, all loaded with the checkpoint's weights; any other key is the method's own, under the
    # mixer's core, and is named in the one log line
    keys, timm_keys = model.state_dict().keys(), dense.state_dict().keys()
    assert timm_keys <= keys
    new = sorted(keys - timm_keys)
    assert all(".attn.core." in k for k in new), new
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    lines = [r.getMessage() for r in caplog.records if "new parameters" in r.getMessage()]
    head = (
        f"visattn: {attn} attention in 2 layer(s) of {NAME} (timm's weights); the method's new parameters: "
    )
    assert len(lines) == 1 and lines[0].startswith(head), lines
    assert sorted(lines[0][len(head) :].split(", ")) == (new or ["none"])
    model.train()
    for key, x in images.items():
        model.zero_grad()
        logits = model(x)
        assert logits.shape == (x.shape[0], 1000), key
        logits.square().mean().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (key, name)
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attn", sorted(DENSE_LIMIT))
def test_dense_limit_equals_timm_dense(attn, tiny_file, dense, images):
    model = build_vit(attn, tiny_file, **DENSE_LIMIT[attn])
    with torch.no_grad():
        for key, x in images.items():
            err = (model(x) - dense(x)).abs().max().item()
            assert err <= 1e-5, (attn, key, err)


SMALL_BUDGET = {
    "longformer": {"kernel_size": 3},
    "bigbird": {"block_size": 2},
    "diet": {"dilation": 2},
    "gmat": {"kernel_size": 3},
    "scram": {"k": 8},
    "clustered": {"clusters": 8, "topk": 8},
    "reformer": {"chunk_size": 4},
}


@pytest.mark.parametrize(
    "attn",
    ["ccnet", "axial", "linear", "performer", "longformer", "dpfp", "bigbird", "diet", "gmat", "slim"]
    + ["informer", "scram", "clustered", "reformer", "fanet"],
)
def test_non_dense_settings_differ_from_dense(attn, tiny_file, dense, images):
    """The equality above is not trivial: these key sets / kernels change the logits visibly."""
    model = build_vit(attn, tiny_file, **SMALL_BUDGET.get(attn, {}))
    with torch.no_grad():
        x = images["160x96"]
        assert (model(x) - dense(x)).abs().max().item() > 1e-3


def _errors(attn, path, x, settings):
    dense = timm.create_model(
        NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **TINY
    ).eval()
    with torch.no_grad():
        ref = dense(x)
        return [(build_vit(attn, path, **s)(x) - ref).square().mean().sqrt().item() for s in settings]


@pytest.mark.parametrize(
    "attn, settings",
    [
        ("performer", [{"num_features": m} for m in (4, 64, 4096)]),
        ("nystrom", [{"landmarks": m, "pinv_iterations": None} for m in ((2, 2), (6, 6), (12, 12))]),
        ("smyrf", [{"cluster_size": c, "n_hashes": 2} for c in (4, 32, 128)]),
        ("longformer", [{"kernel_size": k} for k in (3, 9, 19)]),
        ("bigbird", [{"block_size": 1, "num_random": r} for r in (0, 8, 64)]),
        ("informer", [{"factor": c} for c in (1, 4, 16)]),
        ("scram", [{"k": m} for m in (4, 32, 128)]),
        ("clustered", [{"clusters": 8, "topk": t} for t in (4, 32, 128)]),
        ("clustered", [{"clusters": c, "improved": False} for c in (2, 16, 128)]),
        ("reformer", [{"chunk_size": m, "n_hashes": 2} for m in (4, 16, 64)]),
    ],
)
def test_error_to_dense_shrinks_with_budget(attn, settings, soft_file, images):
    errs = _errors(attn, soft_file, images["224"], settings)
    assert errs[0] > errs[1] > errs[2], (attn, errs)
    assert errs[2] < 0.5 * errs[0], (attn, errs)


def test_prefix_tokens_are_global(tiny_file, images):
    """A patch far outside a 3 x 3 window still changes the class token's output (it attends everything), and
    the class token's input changes every patch output (everything attends it)."""
    model = build_vit("longformer", tiny_file, kernel_size=3)
    attn = model.blocks[0].attn
    x = torch.randn(1, 2 + 10 * 6, 32, requires_grad=True)
    attn._grid_ctx.grid = (10, 6)
    out = attn(x)
    (cls_grad,) = torch.autograd.grad(out[0, 0].sum(), x, retain_graph=True)
    assert cls_grad[0, 2:].abs().sum(-1).gt(0).all()  # the class token reads every patch
    (patch_grad,) = torch.autograd.grad(out[0, 2:].sum(), x)
    assert patch_grad[0, 0].abs().sum() > 0  # every patch reads the class token (through its key/value)


def test_window_receptive_field_on_the_2d_grid(tiny_file):
    """Patch tokens lie on the H x W grid in raster order: a 3 x 3 window reads its 2D neighbours only."""
    model = build_vit("longformer", tiny_file, kernel_size=3)
    attn = model.blocks[0].attn
    attn._grid_ctx.grid = (10, 6)
    x = torch.randn(1, 2 + 60, 32, requires_grad=True)
    r, c = 4, 3
    (g,) = torch.autograd.grad(attn(x)[0, 2 + r * 6 + c].sum(), x)
    read = g[0, 2:].abs().sum(-1).reshape(10, 6) > 0
    expected = torch.zeros(10, 6, dtype=torch.bool)
    expected[r - 1 : r + 2, c - 1 : c + 2] = True
    assert torch.equal(read, expected)
    assert g[0, :2].abs().sum(-1).gt(0).all()


def test_a_deep_copy_hears_its_own_grid(tiny_file, images):
    """copy.deepcopy (an EMA model, say) keeps the grid hook with its mixers: before, the copy's
    patch_embed reported to the original's mixers and the copy guessed a square grid (0.078 off at 160x96)."""
    import copy

    model = build_vit("longformer", tiny_file, kernel_size=3)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(images["160x96"]), model(images["160x96"]))


def test_real_vit_small_shapes(tmp_path, caplog):
    path = tmp_path / "vit_small.safetensors"
    save_file(random_dense_state(), str(path))
    overlay = dict(file=str(path))
    dense = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    model = visattn.create_model(
        NAME, "longformer", attn_kwargs={"kernel_size": 27}, pretrained=True, pretrained_cfg_overlay=overlay
    ).eval()
    assert model.state_dict().keys() == dense.state_dict().keys()
    assert model.blocks[11].attn.num_heads == 6 and model.blocks[11].attn.qkv.in_features == 384
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x) - dense(x)).abs().max().item() <= 1e-5


def test_timm_attn_layer_directly():
    """The mixer class is a plain timm attn_layer; without the grid hook a square grid is inferred (warned)."""
    torch.manual_seed(0)
    model = timm.create_model(NAME, attn_layer=mixer_class("performer", num_features=16), **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.warns(UserWarning, match="inferred as 4x4 with 2 prefix"):
        y = model(x)
    attach_grid(model)
    torch.testing.assert_close(model(x), y)
    assert model(torch.randn(1, 3, 64, 32)).shape == (1, 1000)


@pytest.mark.parametrize(
    "call, match",
    [
        (dict(attn="cbam"), r"cbam cannot be a ViT attention: a channel/spatial gate .* does not mix tokens"),
        (
            dict(attn="gcnet"),
            r"gcnet cannot be a ViT attention: .*ViT mixers: axial, .*, longformer, .*\(visattn.list_attns\(vit=True\)\)",
        ),
        (dict(attn="synthesizer"), r"synthesizer cannot be a ViT attention: .* without q·k"),
        (dict(attn="pkm"), r"pkm cannot be a ViT attention: product-key memory is a learned memory"),
        (
            dict(attn="reformer", attn_kwargs={"n_buckets": 3}),
            r"reformer: n_buckets must be None, 1 or an even",
        ),
        (dict(attn="bigbird", attn_kwargs={"window": 2}), r"bigbird: window must be odd"),
        (
            dict(attn="performer", attn_kwargs={"heads": 4}),
            r"performer as a ViT attention does not take \['heads'\]",
        ),
        (dict(attn="performer", stages=(1,)), r"stages/placement apply to CNNs"),
        (dict(attn="performer", attn_drop_rate=0.1), r"attn_drop=0.1 is not supported"),
        (dict(attn="longformer", attn_kwargs={"kernel_size": 4}), r"kernel_size must be odd"),
        (dict(attn="nope"), r"nope"),
    ],
)
def test_refusals(call, match):
    with pytest.raises(ValueError, match=match):
        visattn.create_model(NAME, **TINY, **call)


def test_every_other_block_has_its_refusal_reason():
    """No block falls through to a generic message: each non-mixer names why (or what a mixer would take)."""
    for name in visattn.list_attns(vit=False):
        with pytest.raises(ValueError, match=rf"^{name} cannot be a ViT attention: ") as err:
            mixer_class(name)
        assert "no functional core" not in str(err.value), name
    assert "reformer" in visattn.list_attns(vit=True) and "synthesizer" in visattn.list_attns(vit=False)


def test_unknown_transformer_family_lists_supported():
    with pytest.raises(
        ValueError, match=r"swin_transformer.*supported transformer families: vision_transformer"
    ):
        visattn.create_model("swin_tiny_patch4_window7_224", "performer")


def test_cnn_path_unchanged():
    model = visattn.create_model("resnet18", "gcnet", num_classes=3).eval()
    assert not any(isinstance(m, ViTMixer) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize(
    "attn, attn_kwargs", [("longformer", dict(kernel_size=5)), ("linformer", dict(k=16)), ("routing", {})]
)
def test_vit_create_model_result_round_trips_through_local_dir(tmp_path, images, attn, attn_kwargs):
    """save_pretrained takes a ViT built by visattn.create_model (before, its ViT branch returned before
    the arguments were recorded, and the save was refused), and local-dir: rebuilds it bit for bit, the
    method's own parameters (linformer's E/F) and buffers (routing's centroids) included."""
    from visattn.models.hf import save_pretrained

    model = visattn.create_model(NAME, attn, attn_kwargs=attn_kwargs, **TINY).eval()
    if attn != "longformer":  # trained-looking state, not what a fresh build would draw
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.is_floating_point():
                    t.add_(0.01 * torch.randn_like(t))
    save_pretrained(model, tmp_path / "vit")
    again = visattn.create_model(f"local-dir:{tmp_path / 'vit'}").eval()
    with torch.no_grad():
        assert torch.equal(again(images["160x96"]), model(images["160x96"]))


@pytest.mark.parametrize("attn", sorted(MIXERS))
def test_mixer_gradients_match_finite_differences(attn):
    """A tiny fp64 ViT (embed 16, depth 1, 2 heads, a 3 x 4 patch grid) with the mixer: gradients of the
    input and of every parameter equal finite differences at batch 1 (gradcheck's fast mode). Training
    mode, except mixers of blocks that draw at random in training (test_contract.RANDOM_IN_TRAINING)."""
    from test_contract import RANDOM_IN_TRAINING

    torch.manual_seed(0)
    model = visattn.create_model(
        NAME, attn, embed_dim=16, depth=1, num_heads=2, dynamic_img_size=True, num_classes=4
    ).double()
    model.train(attn not in RANDOM_IN_TRAINING)
    g = torch.Generator().manual_seed(0)
    draw_zero_parameters_(model, generator=g)  # zero-initialised parts of a core would hide its path
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    # Fresh buffers every call: rfa's random features are redrawn in place in training.
    fn = fixed_state_function(model, names)
    x = torch.randn(1, 3, 48, 64, generator=g, dtype=torch.float64, requires_grad=True)

    torch.manual_seed(4)
    assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)
