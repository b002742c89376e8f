"""The ViT mixers with learned parts of their own (:mod:`visattn.layers.mixers.learned_pattern`, issue 17).

Mixers and their dense limits (the settings at which the ViT equals timm's dense ViT with the same weights):

- ``etc``: ``use_global=False`` with ``local_radius >= max(H, W) - 1`` and the relative embeddings
  (``rel_long``, ``rel_long_bias``) at zero. New parameters per layer: ``rel_long``, ``rel_long_bias``,
  ``global_qkv``, ``rel_global``, ``rel_global_bias``, ``global_update.{weight,bias}``.
- ``sac``: ``window >= max(H, W) - 1`` and ``alpha >= H * W`` (every patch an edge). New parameters:
  ``edge_content.{query,key}.{weight,bias}``, ``edge_mlp.{0,2}.{weight,bias}``.

The cores are checked against naive references written here with explicit loops and masks on a 5 x 7 grid
with 2 prefix tokens (outputs and input gradients, float64), including the prefix rule.
"""

from __future__ import annotations

import math

import pytest
import torch
from vit_helpers import NAME, TINY, build_vit

import visattn
from visattn.layers.mixers import EtcCore, SacCore
from visattn.models.vit import MIXERS, mixer_class

GRID, PREFIX, HEADS, HEAD_DIM, BATCH = (5, 7), 2, 2, 4, 2


def _qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = PREFIX + GRID[0] * GRID[1]
    return [
        (torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
        for _ in range(3)
    ]


def _randomise(core: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter random and O(0.5) (zero-initialised biases would hide a wrong label)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in core.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _masked_attention(q, keys, values, mask, bias, value_scale=None):
    """Softmax over the True entries of ``mask`` (B, Q, K) of q·k/sqrt(d) + bias (B, h, Q, K)."""
    s = q @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    p = torch.softmax(s.masked_fill(~mask[:, None], float("-inf")), dim=-1)
    if value_scale is not None:
        p = p * value_scale[:, None]
    return p @ values


def _prefix_rows(q, k, v):
    return torch.softmax(q[:, :, :PREFIX] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v


# ----------------------------------------------------------------------------------------------- etc


def _etc_reference(core: EtcCore, q, k, v):
    height, width = GRID
    cell, r, kmax = core.patch_size, core.local_radius, core.max_distance
    gh, gw = math.ceil(height / cell), math.ceil(width / cell)
    n_g, n_p = gh * gw, height * width
    link = (2 * kmax + 1) ** 2
    clip = lambda t: max(-kmax, min(kmax, t))  # noqa: E731
    label = lambda dy, dx: (clip(dy) + kmax) * (2 * kmax + 1) + clip(dx) + kmax  # noqa: E731
    cell_of = lambda y, x: (y // cell) * gw + x // cell  # noqa: E731
    pos = [(i // width, i % width) for i in range(n_p)]
    qp, kp, vp = (t[:, :, PREFIX:] for t in (q, k, v))

    def relative(queries, table, table_bias, labels):
        """q · a_label + b_label where labels >= 0, else 0: (B, h, Q, K)."""
        qa = torch.einsum("bhqd,rhd->bhqr", queries, table) + table_bias.t()[None, :, None]
        picked = qa.gather(3, labels.clamp_min(0)[None, None].expand(*qa.shape[:2], -1, -1))
        return picked * (labels >= 0)

    keys, values = [kp], [vp]
    if core.use_global:
        members = [[i for i, (y, x) in enumerate(pos) if cell_of(y, x) == c] for c in range(n_g)]
        qg, kg, vg = (
            torch.stack([t[:, :, m].mean(2) for m in members], 2) + e[None, :, None]
            for t, e in zip((qp, kp, vp), core.global_qkv, strict=True)
        )
        # globals attend [globals, patches, prefix]: g2g offset labels, g2l own/other, prefix unlabelled
        labels = torch.full((n_g, n_g + n_p + PREFIX), -1, dtype=torch.long)
        for a in range(n_g):
            for b in range(n_g):
                labels[a, b] = label(b // gw - a // gw, b % gw - a % gw)
            for i, (y, x) in enumerate(pos):
                labels[a, n_g + i] = link + 1 if cell_of(y, x) == a else link
        all_k = torch.cat([kg, kp, k[:, :, :PREFIX]], 2)
        all_v = torch.cat([vg, vp, v[:, :, :PREFIX]], 2)
        bias = relative(qg, core.rel_global, core.rel_global_bias, labels) * HEAD_DIM**-0.5
        out = _masked_attention(qg, all_k, all_v, torch.ones(BATCH, *labels.shape, dtype=torch.bool), bias)
        delta = core.global_update(out.transpose(1, 2).reshape(BATCH, n_g, HEADS * HEAD_DIM))
        dk, dv = (t.reshape(BATCH, n_g, HEADS, HEAD_DIM).transpose(1, 2) for t in delta.chunk(2, -1))
        keys.append(kg + dk)
        values.append(vg + dv)
    keys.append(k[:, :, :PREFIX])
    values.append(v[:, :, :PREFIX])
    # patches attend their window (out-of-map keys absent), every global (own/other) and the prefix
    total = n_p + (n_g if core.use_global else 0) + PREFIX
    mask = torch.zeros(n_p, total, dtype=torch.bool)
    labels = torch.full((n_p, total), -1, dtype=torch.long)
    for i, (y, x) in enumerate(pos):
        for j, (y2, x2) in enumerate(pos):
            if abs(y2 - y) <= r and abs(x2 - x) <= r:
                mask[i, j], labels[i, j] = True, label(y2 - y, x2 - x)
        if core.use_global:
            for c in range(n_g):
                mask[i, n_p + c], labels[i, n_p + c] = True, link + 1 if cell_of(y, x) == c else link
        mask[i, total - PREFIX :] = True
    bias = relative(qp, core.rel_long, core.rel_long_bias, labels) * HEAD_DIM**-0.5
    out = _masked_attention(qp, torch.cat(keys, 2), torch.cat(values, 2), mask.expand(BATCH, -1, -1), bias)
    return torch.cat([_prefix_rows(q, k, v), out], dim=2)


@pytest.mark.parametrize("use_global", [True, False])
def test_etc_core_matches_naive_reference(use_global):
    core = EtcCore(HEADS * HEAD_DIM, HEADS, patch_size=3, local_radius=2, relative_max_distance=1,
                   use_global=use_global).double()  # fmt: skip
    _randomise(core)
    q, k, v = _qkv()
    out = core(q, k, v, GRID, PREFIX)
    ref = _etc_reference(core, q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v, *core.parameters()))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v, *core.parameters()))
    for name, a, b in zip(["q", "k", "v", *dict(core.named_parameters())], grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


# ----------------------------------------------------------------------------------------------- sac


def _encoding(dy: int, dx: int, freqs: int) -> list[float]:
    sign_log = lambda t: math.copysign(math.log1p(abs(t)), t) if t else 0.0  # noqa: E731
    feats = [sign_log(dy), sign_log(dx)]
    for f in range(freqs):
        w = math.pi / 2**f
        feats += [math.sin(dy * w), math.cos(dy * w), math.sin(dx * w), math.cos(dx * w)]
    return feats


def _sac_reference(core: SacCore, q, k, v):
    height, width = GRID
    r, n_p = core.window, height * width

    def spread(size):  # min(anchors, size) coordinates, evenly over [0, size)
        count = min(core.anchors, size)
        return [math.floor((i + 0.5) * size / count) for i in range(count)]

    anchors = [(y, x) for y in spread(height) for x in spread(width)]
    merge = lambda t: t[:, :, PREFIX:].transpose(1, 2).reshape(BATCH, n_p, -1)  # noqa: E731
    eq, ek = core.edge_content.query(merge(q)), core.edge_content.key(merge(k))
    mask = torch.zeros(BATCH, n_p, PREFIX + n_p, dtype=torch.bool)
    mask[:, :, :PREFIX] = True
    logit = torch.zeros(BATCH, n_p, PREFIX + n_p, dtype=q.dtype)
    for i in range(n_p):
        y, x = divmod(i, width)
        window = [(y + a, x + b) for a in range(-r, r + 1) for b in range(-r, r + 1)]
        far = [(a, b) for a, b in anchors if abs(a - y) > r or abs(b - x) > r]
        cands = [(a, b) for a, b in window + far if 0 <= a < height and 0 <= b < width]
        enc = torch.tensor([_encoding(a - y, b - x, core.freqs) for a, b in cands], dtype=q.dtype)
        ids = [a * width + b for a, b in cands]
        content = torch.einsum("be,bme->bm", eq[:, i], ek[:, ids]) / math.sqrt(core.edge_dim)
        s = core.edge_mlp(enc).squeeze(-1) + content
        best = s.topk(min(core.alpha, len(ids)), dim=-1)
        for bi in range(BATCH):
            for score, slot in zip(best.values[bi], best.indices[bi], strict=True):
                mask[bi, i, PREFIX + ids[int(slot)]] = True
                logit[bi, i, PREFIX + ids[int(slot)]] = score
    soft = torch.sigmoid(logit)
    gate = torch.where(mask, 1 + soft - soft.detach(), torch.ones_like(soft))
    gate[:, :, :PREFIX] = 1.0
    out = _masked_attention(q[:, :, PREFIX:], k, v, mask, 0.0, value_scale=gate)
    return torch.cat([_prefix_rows(q, k, v), out], dim=2), mask


def test_sac_core_matches_naive_reference():
    core = SacCore(HEADS * HEAD_DIM, HEADS, alpha=6, window=1, anchors=3, edge_dim=4, hidden=8, freqs=2)
    core = core.double()
    _randomise(core)
    q, k, v = _qkv()
    out = core(q, k, v, GRID, PREFIX)
    ref, mask = _sac_reference(core, q, k, v)
    assert (mask[:, :, PREFIX:].sum(-1) == 6).all()  # alpha edges per patch, prefix keys besides
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v, *core.parameters()))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v, *core.parameters()))
    # The block scores edges in float32 (its logits are cast), so the predictor's gradient path is float32.
    for name, a, b in zip(["q", "k", "v", *dict(core.named_parameters())], grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    # the predictor learns through the straight-through gate
    assert all(g.abs().sum() > 0 for g in grads[3:])


# ------------------------------------------------------------------------------------ on the ViT


def _images():
    g = torch.Generator().manual_seed(1)
    return {
        "224": torch.randn(1, 3, 224, 224, generator=g),
        "160x96": torch.randn(2, 3, 160, 96, generator=g),
    }


def test_etc_dense_limit_equals_timm_dense(tiny_file, dense):  # noqa: F811
    model = build_vit("etc", tiny_file, use_global=False, local_radius=13)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".core.rel_long" in name:
                p.zero_()
        for key, x in _images().items():
            assert (model(x) - dense(x)).abs().max().item() <= 1e-5, key
    # the paper's init of the relative keys, or the global tokens, move it off dense
    for settings in ({"use_global": False, "local_radius": 13}, {"local_radius": 13}):
        with torch.no_grad():
            x = _images()["160x96"]
            assert (build_vit("etc", tiny_file, **settings)(x) - dense(x)).abs().max().item() > 1e-3, settings


def test_sac_dense_limit_equals_timm_dense(tiny_file, dense):  # noqa: F811
    model = build_vit("sac", tiny_file, window=13, alpha=196)
    with torch.no_grad():
        for key, x in _images().items():
            assert (model(x) - dense(x)).abs().max().item() <= 1e-5, key
        x = _images()["160x96"]
        assert (build_vit("sac", tiny_file)(x) - dense(x)).abs().max().item() > 1e-3


NEW_KEYS = {
    "etc": sorted(["rel_long", "rel_long_bias", "global_qkv", "rel_global", "rel_global_bias"])
    + ["global_update.bias", "global_update.weight"],
    "sac": [
        "edge_content.key.bias",
        "edge_content.key.weight",
        "edge_content.query.bias",
        "edge_content.query.weight",
        "edge_mlp.0.bias",
        "edge_mlp.0.weight",
        "edge_mlp.2.bias",
        "edge_mlp.2.weight",
    ],
}


@pytest.mark.parametrize("attn", ["etc", "sac"])
def test_new_parameters_keys_init_and_gradients(attn, tiny_file, dense):  # noqa: F811
    model = build_vit(attn, tiny_file)
    new = sorted(set(model.state_dict()) - set(dense.state_dict()))
    assert new == sorted(f"blocks.{i}.attn.core.{k}" for i in range(2) for k in NEW_KEYS[attn])
    core = model.blocks[1].attn.core
    fan_in = TINY["embed_dim"]
    if attn == "etc":
        # ETC's initializer_range 0.02 (timm's ViT init would give std 0.02 too, but truncated and only to
        # Linear layers: the Linear update keeps PyTorch's uniform(+-1/sqrt(fan_in)) init, std 1/sqrt(3 fan_in))
        for name in ("rel_long", "rel_global"):
            assert abs(getattr(core, name).std().item() - 0.02) < 0.001, name
        assert abs(core.global_qkv.std().item() - 0.02) < 0.005  # 96 values
        assert not core.rel_long_bias.any() and not core.rel_global_bias.any()
        weights = [core.global_update.weight]
    else:
        weights = [core.edge_content.query.weight, core.edge_content.key.weight]
        std0 = core.edge_mlp[0].weight.std().item()
        assert abs(std0 - (3 * core.edge_mlp[0].in_features) ** -0.5) < 0.015, std0
        assert core.edge_mlp[0].bias.abs().max() > 0  # PyTorch's init; timm's would zero it
    for w in weights:
        assert abs(w.std().item() - (3 * fan_in) ** -0.5) < 0.015, w.std()
        assert w.abs().max() <= fan_in**-0.5
    model.train()
    # every token's features: the class-token logits do not read the last layer's patch outputs
    model.forward_features(_images()["160x96"]).square().mean().backward()
    for name, p in model.named_parameters():
        if ".attn.core." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("attn", ["etc", "sac"])
def test_batch_independence(attn, tiny_file):  # noqa: F811
    model = build_vit(
        attn, tiny_file, **({"patch_size": 2, "local_radius": 1} if attn == "etc" else {"alpha": 5})
    )
    x = torch.randn(3, 3, 80, 112, generator=torch.Generator().manual_seed(2))  # a 5 x 7 grid
    with torch.no_grad():
        together = model(x)
        for i in range(3):
            torch.testing.assert_close(together[i : i + 1], model(x[i : i + 1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "attn, kwargs, match",
    [
        ("etc", {"patch_size": 0}, r"etc: patch_size must be >= 1, got 0"),
        ("etc", {"local_radius": -1}, r"etc: local_radius must be >= 0"),
        ("etc", {"relative_max_distance": -2}, r"etc: relative_max_distance must be >= 0"),
        ("sac", {"alpha": 0}, r"sac: alpha must be an int >= 1, got 0"),
        ("sac", {"window": -1}, r"sac: window must be an int >= 0, got -1"),
        ("sac", {"edge_dim": 0}, r"sac: edge_dim must be an int >= 1"),
        ("sac", {"heads": 2}, r"sac as a ViT attention does not take \['heads'\]; it accepts"),
    ],
)
def test_bad_hyperparameters(attn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mixer_class(attn, **kwargs)
    with pytest.raises(ValueError, match=match):
        visattn.create_model(NAME, attn, attn_kwargs=kwargs, **TINY)


def test_specs_name_their_dense_limits():
    assert "use_global=False" in MIXERS["etc"].dense_limit
    assert "alpha >= H * W" in MIXERS["sac"].dense_limit
