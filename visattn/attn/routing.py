"""Efficient Content-Based Sparse Attention with Routing Transformers — https://arxiv.org/abs/2003.05997

Sequence method on the flattened map (raster order). Routing heads: queries/keys layer-normalised, routed
by online spherical k-means (EMA centroids) so each centroid takes its top-w queries and keys, w = N / k;
attention within clusters. Local heads attend within non-overlapping 2D P x P windows instead of 1D blocks.
Causal: nearest-centroid clusters attended causally in per-cluster chunks (top-w would read the future).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import AttnBlock, ceil_div, default_heads, factory_kwargs, pad_to_grid, to_map, to_tokens
from ..layers.clustering import centroid_scores, commitment_loss, ema_update_, scatter_mean, topw_members
from ..layers.compat import is_exporting
from ..layers.hashing import gather_tokens, resolve_seed, seeded_normal
from ..registry import register_attn


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"routing: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _causal_cluster_attention(q, k, v, q_assign, k_assign, nc: int, w: int, shared_qk: bool) -> torch.Tensor:
    """Causal attention within nearest-centroid clusters, chunked per cluster, (b, h, n, d) -> (b, h, n, d).

    Items (the tokens when QK is shared; else every key and every query as separate items, a pixel's
    key before its query) are sorted by (cluster, position) and each cluster's run is padded to a
    multiple of the chunk length L (w, or 2w for the two items per pixel). A chunk attends to itself
    and the previous chunk, masked to keys of the same cluster at positions <= the query's. An item's
    rank in its cluster counts only earlier items, so the keys a query sees depend on the past only;
    other clusters merely shift where its chunk lies.
    """
    b, h, n, d = q.shape
    dev = q.device
    pos = torch.arange(n, device=dev)
    if shared_qk:
        cluster, order, is_key = q_assign, pos, None
        iq, ik, iv, length = q, k, v, w
    else:
        cluster = torch.cat([k_assign, q_assign], dim=2)
        order = torch.cat([2 * pos, 2 * pos + 1])
        is_key = torch.arange(2 * n, device=dev) < n
        iq, ik, iv, length = torch.cat([q, q], 2), torch.cat([k, k], 2), torch.cat([v, v], 2), 2 * w
    m = cluster.shape[-1]
    # Every cluster adds at most L - 1 padding slots: a static slot count (compiles, no data-dependent shape).
    chunks = (m + nc * (length - 1)) // length
    slots = chunks * length
    with torch.no_grad():
        perm = (cluster * m + order).argsort(dim=-1)
        counts = torch.zeros(b, h, nc, dtype=torch.long, device=dev).scatter_add_(
            -1, cluster, torch.ones_like(cluster)
        )
        padded = (counts + length - 1) // length * length
        sorted_cluster = cluster.gather(-1, perm)
        rank = torch.arange(m, device=dev) - (counts.cumsum(-1) - counts).gather(-1, sorted_cluster)
        slot_sorted = (padded.cumsum(-1) - padded).gather(-1, sorted_cluster) + rank
        # Slot -> item (m: an empty slot, read from an appended dummy row); item -> slot.
        item_at = torch.full((b, h, slots), m, dtype=torch.long, device=dev).scatter_(-1, slot_sorted, perm)
        slot_of = torch.empty_like(perm).scatter_(-1, perm, slot_sorted)
        at_cluster = F.pad(cluster, (0, 1), value=-1).gather(-1, item_at)
        key_ok = at_cluster >= 0
        if is_key is not None:
            key_ok = key_ok & F.pad(is_key, (0, 1), value=False)[item_at]

    def chunked(x):  # (b, h, m, d) items -> (b, h, chunks, L, d) slots, zeros in empty slots
        return gather_tokens(F.pad(x, (0, 0, 0, 1)), item_at).unflatten(2, (chunks, length))

    def with_previous(x):  # keys of the previous chunk, then this chunk's: (b, h, chunks, 2L, d)
        return torch.cat([F.pad(x[:, :, :-1], (0, 0, 0, 0, 1, 0)), x], dim=3)

    cq, ck, cv = chunked(iq), with_previous(chunked(ik)), with_previous(chunked(iv))
    with torch.no_grad():
        # A chunk holds one cluster's items in (position, key-first) order, so "same cluster and not
        # later" is: the previous chunk if it is the same cluster's, and earlier slots of this one.
        key_ok = key_ok.unflatten(2, (chunks, length))
        first = at_cluster.unflatten(2, (chunks, length))[..., 0]  # -1: an unused trailing chunk
        prev_same = (F.pad(first[:, :, :-1], (1, 0), value=-1) == first) & (first >= 0)
        prev_ok = F.pad(key_ok[:, :, :-1], (0, 0, 1, 0), value=False) & prev_same.unsqueeze(-1)
        has_key = (key_ok.cumsum(-1) > 0) | prev_ok.any(-1, keepdim=True)
        eye = torch.eye(length, dtype=torch.bool, device=dev)
        # A row without an admissible key would be all -inf (NaN): open its diagonal, zero its output.
        cur = (eye.logical_not().tril() & key_ok.unsqueeze(-2)) | (eye & (key_ok | ~has_key).unsqueeze(-1))
        mask = torch.cat([prev_ok.unsqueeze(-2).expand_as(cur), cur], dim=-1)
    out = F.scaled_dot_product_attention(
        cq.flatten(1, 2), ck.flatten(1, 2), cv.flatten(1, 2), attn_mask=mask.flatten(1, 2)
    )
    has_key = has_key.unsqueeze(-1)
    out = out * has_key.flatten(1, 2).to(out.dtype)
    out = gather_tokens(out.reshape(b, h, slots, d), slot_of)
    return out if shared_qk else out[:, :, n:]


@register_attn(
    "routing",
    title="Efficient Content-Based Sparse Attention with Routing Transformers",
    arxiv="2003.05997",
    year=2020,
    family="clustering",
    complexity="O(N·k·D + N²·D/k)",
    flops_exponent=2.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    exportable=True,  # measured: ONNX parity with dynamic H, W (docs/support.md)
    export_dynamic_hw=True,
    idea="online k-means routes queries and keys to clusters; attention within clusters + local-window heads",
    reference="https://github.com/google-research/google-research/tree/master/routing_transformer",
)
class Routing(AttnBlock):
    """Routing attention mixed with local 2D-window heads, ``x + proj(attn(x))`` (zero-initialised proj).

    Routing heads (as the authors' code): Q and K are layer-normalised without scale or bias; the
    unit-normalised vectors are compared with k centroids (a buffer, one set per head); each centroid
    takes its top-w queries and top-w keys (w = ceil(N / k): balanced clusters of equal size), and
    queries attend to the keys of their cluster through SDPA. A query taken by several clusters
    averages their outputs; one taken by none gets no routing output (only the residual and the local
    heads). In training the centroids move by an EMA of their members' mean (decay 0.999) and the
    commitment loss ``beta * mean |x - mu(x)|²`` is left in ``self.aux_loss`` (None in eval); a segmentor's ``loss``
    adds it (:func:`visattn.models.pop_attention_aux_losses`), other callers add it to their loss. Under DDP the EMA statistics are all-reduced (see
    ``layers.clustering.ema_update_``). Local heads attend within P x P windows.

    The cluster count k is fixed by the centroid buffer, so w = N / k grows with the map and routing
    costs N²·D / k (the paper's O(N^1.5) needs k ~ √N; its image settings use k = 6-8).

    ``causal=True`` (adapted: top-w membership ranks every token, so it depends on the future): each
    query and key joins its nearest centroid, the paper's routing rule μ(Q_i) = μ(K_j) (argmax of the
    cosine with the centroid buffer, a function of the token alone), and a query attends to the keys
    of its cluster at raster positions <= its own. To bound the cost as balancing does, a cluster's
    items (tokens when QK is shared; else keys and queries, a pixel's key first) are taken in raster
    order in chunks of L = w items (2w when unshared) and a query sees its chunk and the previous
    one: at least the last ~w same-cluster tokens, all of them while its cluster has fewer than 2L
    items before it. The keys a query sees depend only on pixels <= its own; with one cluster this is
    full causal attention. A query without an admissible key gets no routing output. Local windows
    are causal. Training (EMA step, commitment loss) is unchanged.

    Args:
        channels: input channels C.
        heads: attention heads (default: ``default_heads(C)``).
        local_heads: heads using local 2D windows (default: half of the heads, as the paper's CIFAR-10
            model: 4 local + 4 routing).
        num_clusters: k, centroids per routing head (paper's ImageNet-64 model: 8).
        local_window: side P of the local windows (paper: 256-token local blocks, i.e. 16 x 16).
        shared_qk: route (and attend) with one shared query/key projection (the authors' default).
        ema_decay: centroid EMA decay lambda (paper: 0.999).
        commitment: beta, weight of the commitment loss (authors' code: 1e-4).
        qkv_bias: bias of the q/k/v projections.
        seed: seed of the initial centroids (None: drawn from the global RNG at construction).
        causal: raster-order causal attention.
    """

    aux_loss: torch.Tensor | None

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        local_heads: int | None = None,
        num_clusters: int = 8,
        local_window: int = 16,
        shared_qk: bool = True,
        ema_decay: float = 0.999,
        commitment: float = 1e-4,
        qkv_bias: bool = True,
        seed: int | None = None,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        heads = default_heads(channels) if heads is None else _positive_int("heads", heads)
        if channels % heads:
            raise ValueError(f"routing: heads ({heads}) must divide channels ({channels})")
        local_heads = heads // 2 if local_heads is None else _positive_int("local_heads", local_heads, 0)
        if local_heads > heads:
            raise ValueError(f"routing: local_heads ({local_heads}) must be <= heads ({heads})")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"routing: ema_decay must be in [0, 1), got {ema_decay!r}")
        if commitment < 0:
            raise ValueError(f"routing: commitment must be >= 0, got {commitment!r}")
        dd = factory_kwargs(device, dtype)
        self.heads, self.head_dim, self.local_heads = heads, channels // heads, local_heads
        self.num_clusters = _positive_int("num_clusters", num_clusters)
        self.local_window = _positive_int("local_window", local_window)
        self.shared_qk, self.ema_decay, self.commitment = bool(shared_qk), float(ema_decay), float(commitment)
        self.causal = bool(causal)
        self.qkv = nn.Linear(channels, (2 if shared_qk else 3) * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        means = seeded_normal((heads - local_heads, num_clusters, self.head_dim), resolve_seed(seed), **dd)
        self.register_buffer("means", F.normalize(means, dim=-1))
        self.aux_loss = None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        parts = rearrange(self.qkv(to_tokens(x)), "b n (t h d) -> t b h n d", h=self.heads, d=self.head_dim)
        q, k, v = (parts[0], parts[0], parts[1]) if self.shared_qk else parts.unbind(0)
        hl = self.local_heads
        outs = []
        if hl:
            outs.append(self._local(q[:, :hl], k[:, :hl], v[:, :hl], height, width))
        if hl < self.heads:
            outs.append(self._routed(q[:, hl:], k[:, hl:], v[:, hl:]))
        out = self.proj(rearrange(torch.cat(outs, dim=1), "b h n d -> b n (h d)"))
        return x + to_map(out, height, width)

    def _routed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = q.shape
        nc = self.num_clusters
        w = ceil_div(n, nc)
        q = F.layer_norm(q, (d,))
        k = q if self.shared_qk else F.layer_norm(k, (d,))
        qu = F.normalize(q, dim=-1)
        ku = qu if self.shared_qk else F.normalize(k, dim=-1)
        with torch.no_grad():
            q_scores = centroid_scores(qu, self.means)
            k_scores = q_scores if self.shared_qk else centroid_scores(ku, self.means)
        if self.training:
            self._learn(qu, ku, q_scores, k_scores)
        else:
            self.aux_loss = None
        if self.causal:
            q_assign = q_scores.argmax(dim=2)
            k_assign = q_assign if self.shared_qk else k_scores.argmax(dim=2)
            return _causal_cluster_attention(q, k, v, q_assign, k_assign, nc, w, self.shared_qk)

        with torch.no_grad():
            q_idx = topw_members(q_scores, w)  # (b, h, nc, w)
            k_idx = q_idx if self.shared_qk else topw_members(k_scores, w)
        cq = gather_tokens(q, q_idx).flatten(1, 2)  # (b, h*nc, w, d)
        ck = gather_tokens(k, k_idx).flatten(1, 2)
        cv = gather_tokens(v, k_idx).flatten(1, 2)
        out = F.scaled_dot_product_attention(cq, ck, cv)
        return scatter_mean(out.unflatten(1, (h, nc)), q_idx, n)

    def _learn(self, qu, ku, q_scores, k_scores) -> None:
        """Commitment loss for the caller and the EMA k-means step (training only)."""
        q_assign = q_scores.argmax(dim=2)  # (b, h, n): nearest centroid
        loss = commitment_loss(qu, self.means, q_assign)
        if self.shared_qk:
            ema_update_(self.means, qu, q_assign, self.ema_decay)
        else:
            k_assign = k_scores.argmax(dim=2)
            loss = loss + commitment_loss(ku, self.means, k_assign)
            ema_update_(
                self.means, torch.cat([qu, ku], dim=2), torch.cat([q_assign, k_assign], dim=2), self.ema_decay
            )
        self.aux_loss = self.commitment * loss

    def _local(self, q, k, v, height: int, width: int) -> torch.Tensor:
        """Attention within P x P windows of the map, (b, h, n, d) -> (b, h, n, d)."""
        # Sizes by symbolic-safe arithmetic (sym_min/sym_max, ceil by positive operands: ONNX's integer
        # Div truncates), and padding kept in an exported graph, so that one ONNX file serves every H, W.
        p = torch.sym_min(self.local_window, torch.sym_max(height, width))
        b, h, n, d = q.shape
        qkv = rearrange(torch.cat([q, k, v], dim=1), "b h (y x) d -> b (h d) y x", y=height)
        hp, wp = ceil_div(height, p) * p, ceil_div(width, p) * p
        exporting = is_exporting()
        qkv = pad_to_grid(qkv, hp, wp)
        # Windows join the batch-like dims: 4D inputs keep SDPA on its fused kernels.
        wins = rearrange(qkv, "b (t h d) (Y y) (X x) -> t b (h Y X) (y x) d", t=3, h=h, y=p, x=p)
        mask = self._window_mask(height, width, hp, wp, p, q.device, exporting)
        if mask is not None:
            mask = mask.repeat(h, 1, 1)
        out = F.scaled_dot_product_attention(wins[0], wins[1], wins[2], attn_mask=mask)
        out = rearrange(out, "b (h Y X) (y x) d -> b (h d) (Y y) (X x)", h=h, Y=hp // p, y=p)
        return rearrange(out[..., :height, :width], "b (h d) y x -> b h (y x) d", h=h)

    def _window_mask(self, height, width, hp, wp, p, device, exporting=False) -> torch.Tensor | None:
        """(nW, P², P²) keys a window token may see: real (not padding) and, if causal, not later."""
        if not (self.causal or exporting or hp > height or wp > width):
            return None
        ys, xs = torch.arange(hp, device=device), torch.arange(wp, device=device)
        valid = (ys < height).view(-1, 1) & (xs < width).view(1, -1)
        valid = rearrange(valid, "(Y y) (X x) -> (Y X) (y x)", y=p, x=p)
        mask = valid.unsqueeze(-2).expand(-1, p * p, -1)
        if self.causal:
            # Inside a window, raster order is row-major window order: a lower-triangular mask.
            mask = mask & torch.ones(p * p, p * p, dtype=torch.bool, device=device).tril()
        # Every window's top-left token is real and earliest, so no row is empty.
        return mask

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, heads={self.heads}, local_heads={self.local_heads}, "
            f"num_clusters={self.num_clusters}, local_window={self.local_window}, "
            f"shared_qk={self.shared_qk}, causal={self.causal}"
        )
