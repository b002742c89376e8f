"""The content-routed ViT mixers (issue 17): routing (Routing Transformer) and sinkhorn (Sparse Sinkhorn).

Each core is checked against a naive reference written here with explicit loops over samples, heads,
windows, clusters and queries (float64, 5 x 7 patches, 2 prefix tokens: outputs and q/k/v gradients), then
as the attention of a tiny timm ViT whose "pretrained" weights are a random dense state in a local file.

Dense limits (the mixer equals timm's dense ViT with the same weights, logits <= 1e-5):
- routing: ``num_clusters=1`` (one cluster holds every patch) with ``local_window >= max(H, W)`` (one window).
- sinkhorn: ``window_size >= max(H, W)`` (one window; its sorted window is itself).
New state: routing's centroid buffer ``blocks.i.attn.core.means`` (the block's unit Gaussian directions,
moved by the EMA k-means step in training); sinkhorn's SortNet ``blocks.i.attn.core.sort_net.{0,2}.*``
(PyTorch's Linear init, as the block; the paper states none).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from vit_helpers import NAME, TINY, build_vit

import visattn
from visattn.layers.hashing import seeded_normal
from visattn.layers.mixers import RoutingCore, SinkhornCore
from visattn.models.vit import MIXERS

GRID, PREFIX = (5, 7), 2


def _qkv(heads: int, d: int, prefix: int = PREFIX, batch: int = 2, gain: float = 1.5):
    g = torch.Generator().manual_seed(3)
    n = prefix + GRID[0] * GRID[1]
    return [
        (torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64) * gain).requires_grad_()
        for _ in range(3)
    ]


def _softmax_attend(qi, keys, values, bias=None):
    """One query (d,) over explicit keys (m, d): softmax(q·k / sqrt(d) + bias) @ v."""
    logits = keys @ qi / math.sqrt(qi.shape[0])
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, dim=0) @ values


def _check_against(core, reference, prefix, atol=1e-10):
    q, k, v = _qkv(core.heads, core.head_dim, prefix)
    out = core(q, k, v, GRID, prefix)
    ref = reference(q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), cot)
    ref_grads = torch.autograd.grad(ref, (q, k, v), cot)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)


def _window_of(y: int, x: int, p: int) -> tuple[int, int]:
    return y // p, x // p


# -- routing -------------------------------------------------------------------------------------------


def _routing_reference(core: RoutingCore, prefix: int, stats: dict):
    """Naive routing: local heads over explicit p x p windows, routing heads over explicit top-w lists."""
    height, width = GRID
    n = height * width
    hl, nc = core.local_heads, core.means.shape[1]
    w = math.ceil(n / nc)
    p = min(core.holder.block.local_window, max(height, width))

    def reference(q, k, v):
        b, heads, total, d = q.shape
        rows = []
        for bi in range(b):
            per_head = []
            for h in range(heads):
                qh, kh, vh = q[bi, h], k[bi, h], v[bi, h]
                outs = [_softmax_attend(qh[i], kh, vh) for i in range(prefix)]  # prefix: dense
                if h < hl:
                    for i in range(n):
                        yi, xi = divmod(i, width)
                        same = [
                            j for j in range(n) if _window_of(*divmod(j, width), p) == _window_of(yi, xi, p)
                        ]
                        keys = list(range(prefix)) + [prefix + j for j in same]
                        outs.append(_softmax_attend(qh[prefix + i], kh[keys], vh[keys]))
                else:
                    mu = core.means[h - hl].double()

                    def unit(x):
                        x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
                            x.var(-1, unbiased=False, keepdim=True) + 1e-5
                        )
                        return x / x.norm(dim=-1, keepdim=True)

                    cq = (unit(qh[prefix:]) @ mu.T).detach()
                    ck = (unit(kh[prefix:]) @ mu.T).detach()
                    q_members = [
                        set(torch.argsort(cq[:, c], descending=True)[:w].tolist()) for c in range(nc)
                    ]
                    k_members = [
                        sorted(torch.argsort(ck[:, c], descending=True)[:w].tolist()) for c in range(nc)
                    ]
                    for i in range(n):
                        clusters = [c for c in range(nc) if i in q_members[c]]
                        stats["untaken"] += not clusters
                        stats["multi"] += len(clusters) > 1
                        if not clusters:
                            if prefix:
                                pre = list(range(prefix))
                                outs.append(_softmax_attend(qh[prefix + i], kh[pre], vh[pre]))
                            else:
                                outs.append(torch.zeros_like(qh[0]))
                            continue
                        parts = []
                        for c in clusters:
                            keys = list(range(prefix)) + [prefix + j for j in k_members[c]]
                            parts.append(_softmax_attend(qh[prefix + i], kh[keys], vh[keys]))
                        outs.append(torch.stack(parts).mean(0))
                per_head.append(torch.stack(outs))
            rows.append(torch.stack(per_head))
        return torch.stack(rows)

    return reference


@pytest.mark.parametrize("prefix", [PREFIX, 0])
def test_routing_core_matches_naive_reference(prefix):
    core = RoutingCore(64, 4, num_clusters=3, local_ratio=0.5, local_window=3, seed=0).double().eval()
    assert core.local_heads == 2
    stats = {"untaken": 0, "multi": 0}
    _check_against(core, _routing_reference(core, prefix, stats), prefix)
    # The reference exercised both special cases: queries no cluster took, and queries in several clusters.
    assert stats["untaken"] > 0 and stats["multi"] > 0, stats
    assert core.aux_loss is None


def test_routing_training_step_is_the_ema_kmeans_update():
    """Training forward: one EMA step on every centroid that got members (queries and keys, by nearest
    centroid), the commitment loss left in aux_loss; eval leaves the centroids alone."""
    core = RoutingCore(32, 2, num_clusters=4, local_ratio=0.0, ema_decay=0.9, commitment=0.5, seed=1).double()
    q, k, v = _qkv(2, 16, prefix=1)
    before = core.means.clone()
    core.eval()
    core(q, k, v, GRID, 1)
    assert torch.equal(core.means, before) and core.aux_loss is None
    core.train()
    core(q, k, v, GRID, 1)
    units = [F.normalize(F.layer_norm(t[:, :, 1:].detach(), (16,)), dim=-1) for t in (q, k)]
    expected, loss = before.clone(), 0.0
    for h in range(2):
        tokens = torch.cat([u[:, h].reshape(-1, 16) for u in units])  # queries then keys of both samples
        assign = (tokens @ before[h].T).argmax(-1)
        for c in range(4):
            members = tokens[assign == c]
            if len(members):
                expected[h, c] = F.normalize(0.9 * before[h, c] + 0.1 * members.mean(0), dim=0)
        for u in units:
            x = u[:, h].reshape(-1, 16)
            loss += (x - before[h][(x @ before[h].T).argmax(-1)]).square().sum(-1).sum()
    # the shared EMA step accumulates in float32 (DDP all-reduces those sums)
    torch.testing.assert_close(core.means, expected, rtol=0, atol=1e-6)
    assert not torch.equal(core.means, before)
    # The block's loss: per tensor (queries, keys), the mean over samples, heads and tokens, summed.
    torch.testing.assert_close(core.aux_loss.item(), 0.5 * loss.item() / (2 * 2 * 35), rtol=1e-10, atol=0)


def test_routing_centroid_buffer_key_and_init(tiny_file):
    model = build_vit("routing", tiny_file)
    keys = sorted(k for k in model.state_dict() if ".attn.core." in k)
    assert keys == ["blocks.0.attn.core.means", "blocks.1.attn.core.means"]
    # TINY: 2 heads of 16 channels, local_ratio 0.5 -> 1 local head and 1 routing head with 8 centroids
    means = [model.blocks[i].attn.core.means for i in range(2)]
    assert all(m.shape == (1, 8, 16) for m in means)
    for m in means:
        torch.testing.assert_close(m.norm(dim=-1), torch.ones(1, 8), rtol=0, atol=1e-6)
        # random directions: the centroids' cosines are those of Gaussian vectors in 16-D (std 1/4)
        cos = (m[0] @ m[0].T)[~torch.eye(8, dtype=torch.bool)]
        assert cos.abs().max() < 0.95 and cos.square().mean().sqrt() < 0.5
    assert not torch.equal(means[0], means[1])  # seed=None: each layer draws its own
    seeded = RoutingCore(32, 2, num_clusters=8, seed=5)
    torch.testing.assert_close(seeded.means, F.normalize(seeded_normal((1, 8, 16), 5), dim=-1))
    seeded.means.zero_()
    seeded.reset_parameters()
    torch.testing.assert_close(seeded.means, F.normalize(seeded_normal((1, 8, 16), 5), dim=-1))


# -- sinkhorn ------------------------------------------------------------------------------------------


def _sinkhorn_reference(core: SinkhornCore, prefix: int):
    """Naive Sparse Sinkhorn: explicit windows, window means, SortNet, balancing and per-query softmax."""
    height, width = GRID
    n = height * width
    block = core.holder.block
    p = min(block.window_size, max(height, width))
    gy, gx = math.ceil(height / p), math.ceil(width / p)
    slots = [
        [(wy * p + y, wx * p + x) for y in range(p) for x in range(p)] for wy in range(gy) for wx in range(gx)
    ]
    nw, t = len(slots), p * p
    lin1, lin2 = core.sort_net[0], core.sort_net[2]

    def reference(q, k, v):
        b, heads, total, d = q.shape
        rows = []
        for bi in range(b):
            members = [[y * width + x for y, x in win if y < height and x < width] for win in slots]
            e = torch.stack(
                [v[bi, :, [prefix + j for j in m]].mean(1).reshape(-1) for m in members]
            )  # (nW, C)
            s_q = (
                torch.relu(e @ lin1.weight.double().T + lin1.bias.double()) @ lin2.weight.double().T
            ) + lin2.bias.double()
            per_head = []
            for h in range(heads):
                qh, kh, vh = q[bi, h], k[bi, h], v[bi, h]
                k_mean = torch.stack([kh[[prefix + j for j in m]].mean(0) for m in members])
                r = torch.relu(s_q[:, h * d : (h + 1) * d] @ k_mean.T / math.sqrt(d))
                z = r / block.temperature
                for _ in range(block.sinkhorn_iter):
                    z = z - torch.logsumexp(z, dim=1, keepdim=True)
                    z = z - torch.logsumexp(z, dim=0, keepdim=True)
                s = z.exp()
                # slot tensors of every window: (nW, t, d), zeros and valid=False at padding
                valid = torch.tensor([[y < height and x < width for y, x in win] for win in slots])
                wk = torch.zeros(nw, t, d, dtype=q.dtype)
                wv = torch.zeros(nw, t, d, dtype=q.dtype)
                for wi, win in enumerate(slots):
                    for ti, (y, x) in enumerate(win):
                        if y < height and x < width:
                            wk[wi, ti] = kh[prefix + y * width + x]
                            wv[wi, ti] = vh[prefix + y * width + x]
                outs = [_softmax_attend(qh[i], kh, vh) for i in range(prefix)]  # prefix: dense
                for i in range(n):
                    wi = next(a for a, m in enumerate(members) if i in m)
                    sk = torch.einsum("j,jtd->td", s[wi], wk)
                    sv = torch.einsum("j,jtd->td", s[wi], wv)
                    share = (s[wi] @ valid.double()) / s[wi].sum()
                    own = [ti for ti in range(t) if valid[wi, ti]]
                    keep = [ti for ti in range(t) if share[ti] > 0]
                    pk, pv = kh[:prefix], vh[:prefix]
                    keys = torch.cat([pk, wk[wi, own], pk, sk[keep]])
                    values = torch.cat([pv, wv[wi, own], pv, sv[keep]])
                    bias = torch.cat([torch.zeros(prefix + len(own) + prefix), share[keep].log()])
                    outs.append(_softmax_attend(qh[prefix + i], keys, values, bias.to(q.dtype)))
                per_head.append(torch.stack(outs))
            rows.append(torch.stack(per_head))
        return torch.stack(rows)

    return reference


@pytest.mark.parametrize("prefix", [PREFIX, 0])
def test_sinkhorn_core_matches_naive_reference(prefix):
    torch.manual_seed(0)
    core = SinkhornCore(32, 2, window_size=3).double().eval()
    with torch.no_grad():  # a SortNet with larger scores, so S is far from uniform
        core.sort_net[2].weight.mul_(30.0)
    q, k, v = _qkv(2, 16, prefix)
    s = core.sort_matrix(k, v, GRID, prefix)
    assert s.shape == (2, 2, 6, 6) and s.max() > 0.5  # 2 x 3 windows of 3 x 3, some nearly permutation
    # the block's balancing runs in float32, so S (and the outputs) match to float32 rounding
    torch.testing.assert_close(s.sum(-2), torch.ones(2, 2, 6, dtype=s.dtype), rtol=0, atol=1e-6)
    _check_against(core, _sinkhorn_reference(core, prefix), prefix, atol=1e-6)


def test_sinkhorn_sortnet_keys_init_and_gradients(tiny_file, images):
    model = build_vit("sinkhorn", tiny_file)
    keys = sorted(k for k in model.state_dict() if ".attn.core." in k)
    assert keys == [
        f"blocks.{i}.attn.core.sort_net.{j}.{p}" for i in (0, 1) for j in (0, 2) for p in ("bias", "weight")
    ]
    bound = 32**-0.5  # PyTorch's Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weights and biases
    for i in (0, 1):
        for j in (0, 2):
            layer = model.blocks[i].attn.core.sort_net[j]
            for tensor in (layer.weight, layer.bias):
                assert tensor.abs().max() <= bound
            # std of U(-b, b) is b / sqrt(3) = 0.102 (timm's init would give 0.02 and zero biases)
            assert abs(layer.weight.std().item() - bound / math.sqrt(3)) < 0.01
            assert layer.bias.abs().min() > 0
    model.train()
    # Every token's features (the logits read only the class token, which the last layer attends densely).
    # 14 x 14 patches: 2 x 2 windows of 8 x 8; 10 x 6: 2 x 1.
    sum(model.forward_features(x).square().mean() for x in images.values()).backward()
    for name, param in model.named_parameters():
        if ".attn.core." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_sinkhorn_eval_is_deterministic_training_adds_gumbel_noise():
    torch.manual_seed(0)
    core = SinkhornCore(32, 2, window_size=3).double()
    q, k, v = _qkv(2, 16)
    core.eval()
    assert torch.equal(core.sort_matrix(k, v, GRID, PREFIX), core.sort_matrix(k, v, GRID, PREFIX))
    core.train()
    assert not torch.equal(core.sort_matrix(k, v, GRID, PREFIX), core.sort_matrix(k, v, GRID, PREFIX))


# -- both, as the attention of a ViT -------------------------------------------------------------------

DENSE_LIMIT = {"routing": {"num_clusters": 1, "local_window": 14}, "sinkhorn": {"window_size": 14}}
SMALL_BUDGET = {"routing": {"num_clusters": 4, "local_window": 3}, "sinkhorn": {"window_size": 3}}


@pytest.mark.parametrize("attn", sorted(DENSE_LIMIT))
def test_dense_limit_equals_timm_dense(attn, tiny_file, dense, images):
    assert MIXERS[attn].dense_limit is not None
    model = build_vit(attn, tiny_file, **DENSE_LIMIT[attn])
    with torch.no_grad():
        for key, x in images.items():
            err = (model(x) - dense(x)).abs().max().item()
            assert err <= 1e-5, (attn, key, err)
        # the equality is not trivial: a smaller budget changes the logits visibly
        x = images["160x96"]
        assert (build_vit(attn, tiny_file, **SMALL_BUDGET[attn])(x) - dense(x)).abs().max().item() > 1e-3


@pytest.mark.parametrize("attn", sorted(DENSE_LIMIT))
def test_batch_independence_in_eval(attn, tiny_file, images):
    model = build_vit(attn, tiny_file, **SMALL_BUDGET[attn])
    x = images["160x96"]
    with torch.no_grad():
        both = model(x)
        for i in range(2):
            torch.testing.assert_close(model(x[i : i + 1]), both[i : i + 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "attn, kwargs, match",
    [
        ("routing", {"num_clusters": 0}, r"routing: num_clusters must be an int >= 1, got 0"),
        ("routing", {"local_window": 2.5}, r"routing: local_window must be int, got float"),
        ("routing", {"ema_decay": 1.0}, r"routing: ema_decay must be in \[0, 1\)"),
        ("routing", {"local_ratio": 1.5}, r"routing \(ViT mixer\): local_ratio must be in \[0, 1\]"),
        ("routing", {"seed": "a"}, r"routing \(ViT mixer\): seed must be an int or None"),
        ("routing", {"local_heads": 1}, r"routing as a ViT attention does not take \['local_heads'\]"),
        ("sinkhorn", {"window_size": 0}, r"sinkhorn: window_size must be an int >= 1, got 0"),
        ("sinkhorn", {"temperature": 0.0}, r"sinkhorn: temperature must be > 0"),
        ("sinkhorn", {"sinkhorn_iter": True}, r"sinkhorn: sinkhorn_iter must be int, got bool"),
        ("sinkhorn", {"causal": True}, r"sinkhorn as a ViT attention does not take \['causal'\]"),
    ],
)
def test_bad_hyperparameters(attn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        visattn.create_model(NAME, attn, attn_kwargs=kwargs, **TINY)
