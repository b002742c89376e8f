"""Routing Transformer: exact limits, cluster attention against a per-cluster loop, EMA k-means, causality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import build, feature_map, raster_jacobian_support

from visattn.layers.clustering import scatter_mean, topw_members


def _projections(block, x):
    """Per-head q, k, v (B, h, N, d) in float64, exactly as the block computes them."""
    t = x.flatten(2).transpose(1, 2).double()
    w, b = block.qkv.weight.double(), block.qkv.bias.double()
    parts = (t @ w.T + b).unflatten(-1, (-1, block.heads, block.head_dim)).permute(2, 0, 3, 1, 4)
    return (parts[0], parts[0], parts[1]) if block.shared_qk else tuple(parts)


def _attend(q, k, v, causal):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def _finish(block, x, heads_out):
    out = heads_out.permute(0, 2, 1, 3).flatten(2) @ block.proj.weight.double().T + block.proj.bias.double()
    return x.double() + out.transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shared_qk", [True, False])
def test_one_cluster_and_covering_window_is_full_attention(causal, shared_qk):
    block = build(
        "routing",
        16,
        heads=2,
        local_heads=1,
        num_clusters=1,
        local_window=8,
        shared_qk=shared_qk,
        causal=causal,
    ).eval()
    x = feature_map(2, 16, 5, 7)  # the 7 x 7 local window pads: padded keys must be masked
    with torch.no_grad():
        out = block(x)
    q, k, v = _projections(block, x)
    local = _attend(q[:, :1], k[:, :1], v[:, :1], causal)
    qn = F.layer_norm(q[:, 1:], (block.head_dim,))
    kn = qn if shared_qk else F.layer_norm(k[:, 1:], (block.head_dim,))
    routed = _attend(qn, kn, v[:, 1:], causal)
    ref = _finish(block, x, torch.cat([local, routed], 1))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared_qk", [True, False])
def test_routing_matches_a_per_cluster_loop(shared_qk):
    block = build("routing", 16, heads=2, local_heads=0, num_clusters=3, shared_qk=shared_qk).eval()
    x = feature_map(2, 16, 4, 5)
    with torch.no_grad():
        out = block(x)
    q, k, v = _projections(block, x)
    d, n = block.head_dim, 20
    q = F.layer_norm(q, (d,))
    k = q if shared_qk else F.layer_norm(k, (d,))
    means = block.means.double()
    w = math.ceil(n / 3)
    acc = torch.zeros_like(v)
    cnt = torch.zeros(v.shape[:3], dtype=torch.float64)
    for bi in range(2):
        for h in range(2):
            for c in range(3):
                qi = (F.normalize(q[bi, h], dim=-1) @ means[h, c]).topk(w).indices
                ki = (F.normalize(k[bi, h], dim=-1) @ means[h, c]).topk(w).indices
                s = q[bi, h, qi] @ k[bi, h, ki].T / math.sqrt(d)
                acc[bi, h, qi] += s.softmax(-1) @ v[bi, h, ki]
                cnt[bi, h, qi] += 1
    ref = _finish(block, x, acc / cnt.clamp_min(1).unsqueeze(-1))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared_qk", [True, False])
def test_causal_routing_matches_a_per_query_loop(shared_qk):
    """Causal: nearest-centroid clusters; a query sees the same-cluster keys <= its position among the
    items of its chunk and the previous chunk (items of a cluster in (position, key-before-query) order,
    chunks of L = w items, or 2w when keys and queries are separate items)."""
    nc, (hh, ww) = 6, (4, 6)
    block = build(
        "routing", 16, heads=2, local_heads=0, num_clusters=nc, shared_qk=shared_qk, causal=True
    ).eval()
    x = feature_map(2, 16, hh, ww)
    with torch.no_grad():
        out = block(x)
    q, k, v = _projections(block, x)
    d, n = block.head_dim, hh * ww
    q = F.layer_norm(q, (d,))
    k = q if shared_qk else F.layer_norm(k, (d,))
    means = block.means.double()
    length = math.ceil(n / nc) * (1 if shared_qk else 2)
    res, ranks, truncated = torch.zeros_like(v), [], False
    for bi in range(2):
        for h in range(2):
            cq = (F.normalize(q[bi, h], dim=-1) @ means[h].T).argmax(-1).tolist()
            ck = cq if shared_qk else (F.normalize(k[bi, h], dim=-1) @ means[h].T).argmax(-1).tolist()
            for i in range(n):
                c = cq[i]
                if shared_qk:
                    items = [(j, 0) for j in range(i + 1) if ck[j] == c]
                else:
                    items = sorted(
                        [(j, 0) for j in range(i + 1) if ck[j] == c]
                        + [(j, 1) for j in range(i + 1) if cq[j] == c]
                    )
                r = len(items) - 1  # the query's own item is its cluster's latest
                ranks.append(r)
                seen = [j for j, is_query in items[max(0, (r // length - 1) * length) :] if not is_query]
                truncated |= len(seen) < sum(1 for j, is_query in items if not is_query)
                if seen:
                    s = q[bi, h, i] @ k[bi, h, seen].T / math.sqrt(d)
                    res[bi, h, i] = s.softmax(-1) @ v[bi, h, seen]
    assert max(ranks) >= 2 * length and truncated  # several chunks per cluster, some keys out of reach
    torch.testing.assert_close(out.double(), _finish(block, x, res), atol=1e-5, rtol=1e-5)


def test_topw_members_and_scatter_mean():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 4, 10, generator=g)
    idx = topw_members(scores, 3)
    for b, h, c in [(0, 0, 0), (1, 2, 3), (1, 1, 2)]:
        assert idx[b, h, c].tolist() == sorted(scores[b, h, c].topk(3).indices.tolist())
    rows = torch.randn(2, 3, 4, 3, 5, generator=g)
    out = scatter_mean(rows, idx, 10)
    for b, h, t in [(0, 0, 1), (1, 2, 7), (0, 1, 9)]:
        hits = [rows[b, h, c, j] for c in range(4) for j in range(3) if idx[b, h, c, j] == t]
        want = torch.stack(hits).mean(0) if hits else torch.zeros(5)
        torch.testing.assert_close(out[b, h, t], want)


def test_topw_members_breaks_ties_by_position():
    """Tied scores at the w-th place go to the lowest positions (a fixed rule that onnxruntime reproduces),
    whatever the row length; a row whose NaNs leave fewer than w members still gets valid indices."""
    scores = torch.tensor([[1.0, 2, 2, 2, 0, 2, 3, 2]])
    assert topw_members(scores, 1).tolist() == [[6]]
    assert topw_members(scores, 3).tolist() == [[1, 2, 6]]
    assert topw_members(scores, 6).tolist() == [[1, 2, 3, 5, 6, 7]]
    assert topw_members(torch.zeros(2, 9), 4).tolist() == [[0, 1, 2, 3]] * 2
    g = torch.Generator().manual_seed(1)
    levels = torch.randint(0, 4, (3, 50), generator=g).float()  # many ties at every threshold
    for w in (1, 7, 20, 50):
        for row, idx in zip(levels, topw_members(levels, w), strict=True):
            order = sorted(range(50), key=lambda i: (-row[i].item(), i))  # by score, then position
            assert idx.tolist() == sorted(order[:w])
    nan = torch.tensor([[0.0, float("nan"), 1.0, 2.0]])
    assert topw_members(nan, 3).max() < 4


def test_ema_centroids_move_in_training_only_and_commitment_loss():
    block = build("routing", 16, heads=2, local_heads=0, num_clusters=3, ema_decay=0.5, shared_qk=True)
    x = feature_map(2, 16, 4, 5)
    before = block.means.clone()
    with torch.no_grad():
        block.eval()(x)
    torch.testing.assert_close(block.means, before, atol=0, rtol=0)
    assert block.aux_loss is None

    q, _, _ = _projections(block, x)
    qu = F.normalize(F.layer_norm(q, (block.head_dim,)), dim=-1)
    assign = (qu @ before.double().transpose(-1, -2).unsqueeze(0)).argmax(-1)  # (b, h, n)
    want, loss = before.double().clone(), 0.0
    for h in range(2):
        for c in range(3):
            members = qu[:, h][assign[:, h] == c]
            if len(members):
                want[h, c] = F.normalize(0.5 * before[h, c].double() + 0.5 * members.mean(0), dim=0)
        loss = loss + (qu[:, h] - before.double()[h][assign[:, h]]).square().sum(-1).mean() / 2
    block.train()(x)
    torch.testing.assert_close(block.means.double(), want, atol=1e-5, rtol=1e-5)
    assert block.aux_loss is not None and block.aux_loss.requires_grad
    torch.testing.assert_close(block.aux_loss.double(), block.commitment * loss, atol=1e-9, rtol=1e-5)
    block.aux_loss.backward()
    assert block.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shared_qk", [True, False])
def test_causal_with_local_heads_and_clusters_never_sees_the_future(shared_qk):
    block = build(
        "routing",
        16,
        heads=2,
        local_heads=1,
        num_clusters=3,
        local_window=3,
        shared_qk=shared_qk,
        causal=True,
    ).eval()
    support = raster_jacobian_support(block, 16, 4, 6)
    assert not (support & torch.ones_like(support).triu(1)).any()
    assert (support & torch.ones_like(support).tril(-1)).any()


def test_invalid_hyperparameters():
    import visattn

    for kwargs in (dict(num_clusters=0), dict(local_heads=3, heads=2), dict(ema_decay=1.0), dict(heads=3)):
        with pytest.raises(ValueError, match="^routing: "):
            visattn.create_attn("routing", 16, **kwargs)


@pytest.mark.parametrize("shared_qk", [True, False])
def test_causal_past_outputs_ignore_future_values(shared_qk):
    """Cluster membership is discrete (no gradient): change every later pixel and compare values."""
    block = build("routing", 16, heads=2, local_heads=0, num_clusters=3, shared_qk=shared_qk, causal=True)
    x = feature_map(1, 16, 6, 7, seed=1)
    with torch.no_grad():
        ref = block.eval()(x).flatten(2)
        for p in (4, 20, 33):
            y = x.clone().flatten(2)
            y[..., p + 1 :] = 3 * feature_map(1, 16, 1, 41 - p, seed=p).flatten(2)
            out = block(y.view_as(x)).flatten(2)
            torch.testing.assert_close(out[..., : p + 1], ref[..., : p + 1], atol=1e-6, rtol=0)
            assert not torch.allclose(out[..., p + 1 :], ref[..., p + 1 :])


@pytest.mark.slow
def test_onnx_parity_at_an_uneven_size_and_with_tied_tokens(tmp_path):
    """One dynamic-shape ONNX file matches eager where N is not a multiple of k (w = ceil(N / k): a
    symbolic -(-N // k) became a truncating Div) and on a map with a constant region (tied scores)."""
    pytest.importorskip("onnxruntime")
    from visattn import export

    block = build("routing", 32, heads=2, local_heads=1, local_window=8).eval()
    x = feature_map(2, 32, 16, 20)
    path = export.export_onnx(block, x, tmp_path / "routing.onnx")
    tied = feature_map(2, 32, 13, 9)
    tied[:, :, 5:] = tied[:, :, :1, :1]
    for t in (x, feature_map(2, 32, 13, 9), tied):
        assert export.onnx_max_error(path, block, t) <= export.ONNX_TOL
