"""Segmentor, heads and create_segmentor.

The heads are checked against references that follow mmsegmentation's forward code step by step
(reshapes, permutes and loops as mmseg writes them), so the layout is mmseg's even without mmseg
installed; tests/test_mmseg_reference.py compares with mmseg's own code when it is installed.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import perturb_

import visattn
from visattn.models import Segmentor, create_segmentor
from visattn.models.heads import HEADS, AttnHead, CCHead, DAHead, DNLHead, EMAHead, GCHead, ISAHead, NLHead

SMALL = {
    "backbone": "resnet10t",
    "head_kwargs": {"channels": 16},
    "aux_kwargs": {"channels": 8},
    "num_classes": 5,
}


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb parameters and give every BN random statistics (zero/one inits hide layout errors)."""
    perturb_(module, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module


def feats(b=2, c=12, h=5, w=7, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


# -- the generic head works with every block --------------------------------------------------------------
@pytest.mark.parametrize("name", visattn.list_attns())
def test_attn_head_builds_and_runs_for_every_block(name):
    torch.manual_seed(0)
    head = AttnHead(12, 16, 3, attn=name).eval()
    x = feats(1, 12, 6, 5)
    with torch.no_grad():
        out = head(x)
    assert out.shape == (1, 3, 6, 5)
    assert torch.isfinite(out).all()
    assert [n for n, _ in head.named_children()] == ["dropout", "conv_seg", "convs", "conv_cat", "attn"]


def test_attn_head_segmentor_end_to_end_train_and_eval():
    model = create_segmentor({**SMALL, "head": "attn", "attn": "cbam"})
    assert isinstance(model.decode_head, AttnHead) and model.decode_head.attn_name == "cbam"
    x = torch.randn(2, 3, 40, 36)
    model.train()
    outputs = model(x)
    assert set(outputs) == {"out", "aux"}
    assert all(v.shape == (2, 5, 40, 36) for v in outputs.values())
    target = torch.randint(0, 5, (2, 40, 36))
    target[:, :4] = 255
    total, parts = model.loss(outputs, target)
    assert set(parts) == {"out", "aux"}
    total.backward()
    expected = F.cross_entropy(outputs["out"], target, ignore_index=255, reduction="sum") / target.numel()
    torch.testing.assert_close(parts["out"], expected)
    torch.testing.assert_close(
        parts["aux"] / 0.4,
        F.cross_entropy(outputs["aux"], target, ignore_index=255, reduction="sum") / target.numel(),
    )


def test_head_shorthand_and_errors():
    model = create_segmentor({**SMALL, "head": "performer", "aux": False})
    assert isinstance(model.decode_head, AttnHead) and model.auxiliary_head is None
    with pytest.raises(ValueError, match="unknown segmentor config key"):
        create_segmentor({**SMALL, "heads": "fcn"})
    with pytest.raises(ValueError, match="did you mean"):
        create_segmentor({**SMALL, "head": "ccnett"})
    with pytest.raises(ValueError, match="unknown segmentor"):
        create_segmentor("ccnet_r50-d8_cityscape-512x1024")
    with pytest.raises(ValueError, match="data"):
        create_segmentor({**SMALL, "data": {"means": [1, 2, 3]}})
    with pytest.raises(ValueError, match="pretrained=True needs"):
        create_segmentor(SMALL, pretrained=True)


# -- the segmentor --------------------------------------------------------------------------------
def test_eval_returns_logits_at_input_size_and_skips_aux():
    model = randomize_(create_segmentor({**SMALL, "head": "fcn"})).eval()
    calls = []
    model.auxiliary_head.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        out = model(x)
        feats_ = model.backbone(x)
        ref = F.interpolate(
            model.decode_head(feats_[-1]), size=(37, 45), mode="bilinear", align_corners=False
        )
    assert out.shape == (1, 5, 37, 45) and not calls
    torch.testing.assert_close(out, ref)
    assert feats_[-1].shape[-2:] == (5, 6)  # output stride 8: ceil(37 / 8), ceil(45 / 8)


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "seg.yaml"
    path.write_text(
        "backbone: resnet10t\nhead: gcnet\nhead_kwargs: {channels: 16}\nnum_classes: 4\n"
        "aux_kwargs: {channels: 8}\ndata: {dataset: cityscapes}\n"
    )
    model = create_segmentor(str(path), num_classes=3, aux=False)
    assert isinstance(model.decode_head, GCHead) and model.num_classes == 3 and model.auxiliary_head is None
    assert model.data_cfg["dataset"] == "cityscapes" and model.data_cfg["mean"] == [123.675, 116.28, 103.53]


def test_zoo_names_resolve_to_mmseg_architectures():
    from visattn import hub

    names = hub.list_pretrained()
    assert len(names) == 31
    expected = {
        "ccnet": CCHead,
        "emanet": EMAHead,
        "gcnet": GCHead,
        "isanet": ISAHead,
        "nonlocal": NLHead,
        "dnl": DNLHead,
        "danet": DAHead,
    }
    for method, cls in expected.items():
        with torch.device("meta"):
            model = create_segmentor(f"{method}_r101-d8_cityscapes-512x1024")
        assert type(model.decode_head) is cls
        assert model.decode_head.in_channels == 2048 and model.auxiliary_head.in_channels == 1024
        assert model.num_classes == 19
    with torch.device("meta"):
        ade = create_segmentor("ccnet_r50-d8_ade20k-512x512")
    assert ade.num_classes == 150 and ade.data_cfg["dataset"] == "ade20k"
    assert ade.data_cfg["test_scale"] == [2048, 512] and ade.data_cfg["crop_size"] == [512, 512]


def test_backbone_is_resnetv1c_d8():
    """mmseg's ResNetV1c-D8: deep stem 32-32-64, strides (1, 2, 1, 1), dilations (1, 1, 2, 4) with
    contract_dilation (the first block of a dilated stage uses half the dilation), output stride 8."""
    with torch.device("meta"):
        model = create_segmentor("fcn_r50-d8_cityscapes-512x1024")
    bb = model.backbone
    assert [bb.conv1[i].out_channels for i in (0, 3, 6)] == [32, 32, 64]
    assert bb.conv1[0].stride == (2, 2) and bb.maxpool.stride == 2
    for layer, stride, dilations in (
        ("layer1", 1, [1] * 3),
        ("layer2", 2, [1] * 4),
        ("layer3", 1, [1] + [2] * 5),
        ("layer4", 1, [2, 4, 4]),
    ):
        blocks = list(getattr(bb, layer))
        assert [b.conv2.dilation[0] for b in blocks] == dilations, layer
        assert [b.conv2.padding[0] for b in blocks] == dilations, layer  # padding = dilation (same size)
        assert blocks[0].conv2.stride == (stride, stride) and blocks[0].conv1.stride == (
            1,
            1,
        )  # 'pytorch' style
        assert type(blocks[0].downsample[0]) is nn.Conv2d  # V1c: 1x1 conv shortcut (V1d would avg-pool)
    assert bb.feature_info.reduction()[-2:] == [8, 8]
    eps = {m.eps for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert eps == {1e-5}


def test_heads_have_mmseg_classifier_dropout_and_widths():
    with torch.device("meta"):
        models = {
            m: create_segmentor(f"{m}_r50-d8_cityscapes-512x1024")
            for m in ["fcn", "ccnet", "emanet", "gcnet", "isanet", "nonlocal", "dnl", "danet"]
        }
    for method, model in models.items():
        head, aux = model.decode_head, model.auxiliary_head
        for h in (head, aux):
            assert isinstance(h.dropout, nn.Dropout2d) and h.dropout.p == 0.1, method
            assert h.conv_seg.kernel_size == (1, 1) and h.conv_seg.out_channels == 19
        assert head.channels == (256 if method == "emanet" else 512), method
        assert aux.channels == 256 and not aux.concat_input and len(aux.convs) == 1
        assert model.aux_weight == 0.4
        if method in ("fcn", "ccnet", "gcnet", "nonlocal", "dnl", "emanet"):
            assert head.conv_cat.conv.in_channels == 2048 + head.channels, method


# -- heads against mmseg's forward, written out --------------------------------------------------
def ref_criss_cross(cca, x):
    """mmcv's CrissCrossAttention.forward: energies along columns with -inf on the diagonal, along rows."""
    b, c, h, w = x.shape
    q, k, v = cca.query_conv(x), cca.key_conv(x), cca.value_conv(x)
    neg_inf_diag = torch.diag(torch.full((h,), float("-inf"), dtype=x.dtype))
    energy_h = (torch.einsum("bchw,bciw->bwhi", q, k) + neg_inf_diag).transpose(1, 2)
    energy_w = torch.einsum("bchw,bchj->bhwj", q, k)
    attn = torch.softmax(torch.cat([energy_h, energy_w], dim=-1), dim=-1)
    out = torch.einsum("bciw,bhwi->bchw", v, attn[..., :h]) + torch.einsum(
        "bchj,bhwj->bchw", v, attn[..., h:]
    )
    return out * cca.gamma + x


def ref_fcn_attn(head, x, block_fn):
    out = head.convs[0](x)
    out = block_fn(out)
    out = head.convs[1](out)
    out = head.conv_cat(torch.cat([x, out], dim=1))
    return head.conv_seg(out)


def ref_nonlocal(nl, x, temperature=None):
    """mmcv NonLocal2d (embedded Gaussian) / mmseg DisentangledNonLocal2d, as written there."""
    n = x.size(0)
    inter = nl.inter_channels
    g_x = nl.g(x).view(n, inter, -1).permute(0, 2, 1)
    theta_x = nl.theta(x).view(n, inter, -1).permute(0, 2, 1)
    phi_x = nl.phi(x).view(n, inter, -1)
    if temperature is not None:
        theta_x = theta_x - theta_x.mean(dim=-2, keepdim=True)
        phi_x = phi_x - phi_x.mean(dim=-1, keepdim=True)
    pairwise = torch.matmul(theta_x, phi_x) / theta_x.shape[-1] ** 0.5
    if temperature is not None:
        pairwise = pairwise / temperature
    y = torch.matmul(pairwise.softmax(dim=-1), g_x).permute(0, 2, 1).reshape(n, inter, *x.shape[2:])
    if temperature is not None:
        unary = torch.matmul(nl.conv_mask(x).view(n, 1, -1).softmax(dim=-1), g_x)
        y = y + unary.permute(0, 2, 1).reshape(n, inter, 1, 1)
    return x + nl.conv_out(y)


def ref_context_block(gc, x):
    """mmcv ContextBlock, pooling 'att', fusion channel_add."""
    b, c, h, w = x.shape
    mask = gc.attn_logits(x).view(b, 1, h * w).softmax(dim=2).unsqueeze(-1)
    context = torch.matmul(x.view(b, c, h * w).unsqueeze(1), mask).view(b, c, 1, 1)
    return x + gc.transform(context)


def ref_isa(head, x_):
    """mmseg ISAHead.forward with its view/permute sequence."""
    x = head.in_conv(x_)
    residual = x
    n, c, h, w = x.size()
    loc_h, loc_w = head.down_factor
    glb_h, glb_w = math.ceil(h / loc_h), math.ceil(w / loc_w)
    pad_h, pad_w = glb_h * loc_h - h, glb_w * loc_w - w
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    x = x.view(n, c, glb_h, loc_h, glb_w, loc_w).permute(0, 3, 5, 1, 2, 4).reshape(-1, c, glb_h, glb_w)
    x = head.global_relation(x)
    x = x.view(n, loc_h, loc_w, c, glb_h, glb_w).permute(0, 4, 5, 3, 1, 2).reshape(-1, c, loc_h, loc_w)
    x = head.local_relation(x)
    x = (
        x.view(n, glb_h, glb_w, c, loc_h, loc_w)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(n, c, glb_h * loc_h, glb_w * loc_w)
    )
    if pad_h > 0 or pad_w > 0:
        x = x[:, :, pad_h // 2 : pad_h // 2 + h, pad_w // 2 : pad_w // 2 + w]
    return head.conv_seg(head.out_conv(torch.cat([x, residual], dim=1)))


def ref_isa_relation(rel, x):
    """mmseg's ISA SelfAttentionBlock: two conv-BN-ReLU for q/k, conv for v, softmax(q k^T / sqrt(d)) v."""
    n = x.size(0)
    q = rel.query_project(x).flatten(2).permute(0, 2, 1)
    k = rel.key_project(x).flatten(2)
    v = rel.value_project(x).flatten(2).permute(0, 2, 1)
    sim = (q.shape[-1] ** -0.5 * torch.matmul(q, k)).softmax(dim=-1)
    ctx = torch.matmul(sim, v).permute(0, 2, 1).reshape(n, -1, *x.shape[2:])
    return rel.output_project(ctx)


def ref_ema(head, x):
    """mmseg EMAHead / EMAModule.forward: T EM stages under no_grad from the stored bases."""
    feats = head.ema_in_conv(x)
    identity = feats
    f = head.ema_mid_conv(feats)
    b, c, h, w = f.shape
    f = f.view(b, c, h * w)
    bases = head.ema_module.bases.repeat(b, 1, 1)
    for _ in range(head.ema_module.num_stages):
        attention = torch.einsum("bcn,bck->bnk", f, bases).softmax(dim=2)
        bases = F.normalize(torch.einsum("bcn,bnk->bck", f, F.normalize(attention, dim=1, p=1)), dim=1, p=2)
    recon = torch.einsum("bck,bnk->bcn", bases, attention).view(b, c, h, w)
    out = F.relu(identity + head.ema_out_conv(F.relu(recon)))
    out = head.bottleneck(out)
    return head.conv_seg(head.conv_cat(torch.cat([x, out], dim=1)))


def ref_da(head, x):
    """mmseg DAHead.forward: PAM (unscaled softmax(q k^T) v) and CAM (softmax(max E - E)) branches."""

    def pam(m, t):
        n = t.size(0)
        q = m.query_project(t).flatten(2).permute(0, 2, 1)
        k = m.key_project(t).flatten(2)
        v = m.value_project(t).flatten(2).permute(0, 2, 1)
        ctx = (
            torch.matmul(torch.matmul(q, k).softmax(dim=-1), v).permute(0, 2, 1).reshape(n, -1, *t.shape[2:])
        )
        return m.gamma * ctx + t

    def cam(m, t):
        b, c, h, w = t.shape
        q = t.view(b, c, -1)
        energy = torch.bmm(q, q.permute(0, 2, 1))
        energy = torch.max(energy, -1, keepdim=True)[0].expand_as(energy) - energy
        out = torch.bmm(energy.softmax(dim=-1), q).view(b, c, h, w)
        return m.gamma * out + t

    p = head.pam_out_conv(pam(head.pam, head.pam_in_conv(x)))
    c = head.cam_out_conv(cam(head.cam, head.cam_in_conv(x)))
    return head.conv_seg(p + c), head.pam_conv_seg(p), head.cam_conv_seg(c)


HEAD_REFERENCES = {
    "ccnet": (
        lambda: CCHead(12, 16, 3),
        lambda h, x: ref_fcn_attn(h, x, lambda t: ref_criss_cross(h.cca, ref_criss_cross(h.cca, t))),
    ),
    "gcnet": (
        lambda: GCHead(12, 16, 3),
        lambda h, x: ref_fcn_attn(h, x, lambda t: ref_context_block(h.gc_block, t)),
    ),
    "nonlocal": (
        lambda: NLHead(12, 16, 3),
        lambda h, x: ref_fcn_attn(h, x, lambda t: ref_nonlocal(h.nl_block, t)),
    ),
    "dnl": (
        lambda: DNLHead(12, 16, 3),
        lambda h, x: ref_fcn_attn(h, x, lambda t: ref_nonlocal(h.dnl_block, t, temperature=0.05)),
    ),
    "isanet": (lambda: ISAHead(12, 16, 3, isa_channels=8, down_factor=(2, 3)), ref_isa),
    "emanet": (lambda: EMAHead(12, 8, 3, ema_channels=16, num_bases=4), ref_ema),
    "danet": (lambda: DAHead(12, 16, 3, pam_channels=4), lambda h, x: ref_da(h, x)[0]),
}


@pytest.mark.parametrize("method", sorted(HEAD_REFERENCES))
def test_head_matches_mmseg_forward(method):
    build, reference = HEAD_REFERENCES[method]
    torch.manual_seed(0)
    head = randomize_(build().double(), seed=3).eval()
    x = feats(2, 12, 5, 7).double()
    with torch.no_grad():
        torch.testing.assert_close(head(x), reference(head, x), atol=1e-9, rtol=1e-7)


def test_isa_relations_are_mmseg_self_attention():
    head = randomize_(ISAHead(12, 16, 3, isa_channels=8).double(), seed=4).eval()
    x = feats(3, 16, 2, 3).double()
    with torch.no_grad():
        for rel in (head.global_relation, head.local_relation):
            torch.testing.assert_close(rel(x), ref_isa_relation(rel, x), atol=1e-9, rtol=1e-7)


def test_danet_head_training_outputs_and_weights():
    head = randomize_(DAHead(12, 16, 3, pam_channels=4).double(), seed=5).eval()
    x = feats(2, 12, 4, 5).double()
    with torch.no_grad():
        outs = head.forward_train(x)
        ref = ref_da(head, x)
    for key, r in zip(("out", "pam", "cam"), ref, strict=True):
        torch.testing.assert_close(outs[key], r, atol=1e-9, rtol=1e-7)
    model = create_segmentor({**SMALL, "head": "danet", "head_kwargs": {"channels": 16, "pam_channels": 4}})
    assert model.loss_weights == {"out": 1.0, "pam": 1.0, "cam": 1.0, "aux": 0.4}
    assert set(model.train()(torch.randn(1, 3, 32, 32))) == {"out", "pam", "cam", "aux"}


def test_ema_head_frozen_mid_conv_and_bases_move_in_training_only():
    head = EMAHead(12, 8, 3, ema_channels=16, num_bases=4)
    assert not any(p.requires_grad for p in head.ema_mid_conv.parameters())
    bases = head.ema_module.bases.clone()
    head.eval()(feats())
    assert torch.equal(head.ema_module.bases, bases)
    out = head.train()(feats())
    assert not torch.equal(head.ema_module.bases, bases)
    out.sum().backward()
    assert head.ema_in_conv.conv.weight.grad is not None and head.ema_out_conv.conv.weight.grad is not None


def test_every_head_class_is_registered():
    assert set(HEADS) == {"fcn", "ccnet", "emanet", "gcnet", "isanet", "nonlocal", "dnl", "danet", "attn"}
    assert isinstance(create_segmentor(SMALL), Segmentor)


@pytest.mark.parametrize("attn", ["routing", "compressive"])
def test_attention_blocks_auxiliary_losses_join_the_training_loss(attn):
    """routing's commitment loss and compressive's reconstruction loss are part of the loss the trainer
    backpropagates (as ``attn_aux``), read once per forward; a block without one adds nothing."""
    from visattn.models import pop_attention_aux_losses

    model = create_segmentor({**SMALL, "head": "attn", "attn": attn}).train()
    block = model.decode_head.attn
    x, target = torch.randn(2, 3, 40, 36), torch.randint(0, 5, (2, 40, 36))
    outputs = model(x)
    aux = block.aux_loss
    assert isinstance(aux, torch.Tensor) and aux.requires_grad and aux.item() > 0
    total, parts = model.loss(outputs, target)
    assert parts["attn_aux"] is aux and block.aux_loss is None
    torch.testing.assert_close(total, parts["out"] + parts["aux"] + aux)
    assert pop_attention_aux_losses(model) is None  # read once: no stale loss of a freed graph
    _, again = model.loss(outputs, target)
    assert set(again) == {"out", "aux"}
    plain = create_segmentor({**SMALL, "head": "attn", "attn": "cbam"}).train()
    assert set(plain.loss(plain(x), target)[1]) == {"out", "aux"}
