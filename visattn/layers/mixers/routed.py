"""Content-routed mixer cores: the Routing Transformer's online k-means clusters and Sparse Sinkhorn
attention's sorted windows, over a ViT's pretrained q, k, v. Both gather their key sets once (top-w cluster
members, or a soft sort of whole windows) and attend all equal-size groups in one batched SDPA."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..clustering import centroid_scores, commitment_loss, ema_update_, scatter_mean, topw_members
from ..hashing import gather_tokens, resolve_seed, seeded_normal
from ..padding import ceil_div, pad_to_multiple
from ..precision import upcast_for_accuracy
from .base import BlockHolder, MixerCore

__all__ = ["RoutingCore", "SinkhornCore", "grid_windows", "window_valid"]


def grid_windows(t: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """Patch tokens (B, h, H*W, d) -> non-overlapping p x p windows (B, h, nW, p*p, d), zero-padded at
    the bottom/right of the grid (the blocks' padding rule)."""
    m = rearrange(t, "b h (y x) d -> b h d y x", y=grid[0])
    m, _ = pad_to_multiple(m, p)
    return rearrange(m, "b h d (Y y) (X x) -> b h (Y X) (y x) d", y=p, x=p)


def window_valid(grid: tuple[int, int], p: int, device) -> torch.Tensor:
    """(nW, p*p) bool: which window slots hold a patch (the others are padding)."""
    height, width = grid
    hp, wp = ceil_div(height, p) * p, ceil_div(width, p) * p
    ok = (torch.arange(hp, device=device) < height).view(-1, 1) & (torch.arange(wp, device=device) < width)
    return rearrange(ok, "(Y y) (X x) -> (Y X) (y x)", y=p, x=p)


def _from_windows(t: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """Inverse of :func:`grid_windows`: (B, h, nW, p*p, d) -> (B, h, H*W, d), padding cropped."""
    height, width = grid
    gx = ceil_div(width, p)
    m = rearrange(t, "b h (Y X) (y x) d -> b h (Y y) (X x) d", X=gx, y=p)
    return rearrange(m[:, :, :height, :width], "b h y x d -> b h (y x) d")


def _prefix_per_group(t: torch.Tensor, prefix: int, groups: int) -> torch.Tensor:
    """The prefix rows of (B, h, P + N, d) repeated for every group: (B, h, groups, P, d) (a view)."""
    pre = t[:, :, :prefix].unsqueeze(2)
    return pre.expand(-1, -1, groups, -1, -1)


class RoutingCore(MixerCore):
    """Routing Transformer on a ViT: the first ``int(local_ratio * heads)`` heads attend within
    non-overlapping ``local_window`` x ``local_window`` windows of the patch grid (the block's local heads);
    the other heads are routing heads. A routing head compares its unit-normalised, layer-normalised patch
    queries and keys (the block's routing space) with its k = ``num_clusters`` centroids; each centroid takes
    its top-w queries and top-w keys, w = ceil(N / k) (:func:`visattn.layers.clustering.topw_members`), and
    the clusters attend as one batched SDPA over the pretrained q, k, v. A query taken by several clusters
    averages their outputs, as the block. Prefix keys join every window's and every cluster's key set; a
    patch query no cluster took attends the prefix keys alone (zero output without prefix tokens, as the
    block). A ViT's q and k are separate projections, so routing is the block's ``shared_qk=False``.

    The centroids are the persistent buffer ``means`` (routing heads, k, d): state a timm checkpoint lacks.
    :meth:`reset_parameters` draws them as the block does (unit-normalised Gaussian directions, from
    ``seed``; ``seed=None`` draws from the global RNG, so each layer gets its own). In training mode every
    forward moves them by the EMA k-means step (decay ``ema_decay``, all-reduced under DDP) and leaves the
    commitment loss ``commitment * mean |x - mu(x)|^2`` in ``self.aux_loss``, which a segmentor's ``loss`` adds
    (None in eval, where the core is deterministic). Dense limit: ``num_clusters=1`` (one cluster
    holds every patch) with ``local_window >= max(H, W)`` (one window)."""

    aux_loss: torch.Tensor | None

    def __init__(self, dim: int, heads: int, *, num_clusters: int = 8, local_ratio: float = 0.5,
                 local_window: int = 16, ema_decay: float = 0.999, commitment: float = 1e-4,
                 seed: int | None = None) -> None:  # fmt: skip
        super().__init__(dim, heads)
        if isinstance(local_ratio, bool) or not isinstance(local_ratio, (int, float)):
            raise ValueError(
                f"routing (ViT mixer): local_ratio must be a number in [0, 1], got {local_ratio!r}"
            )
        if not 0.0 <= local_ratio <= 1.0:
            raise ValueError(
                f"routing (ViT mixer): local_ratio must be in [0, 1] (the share of each layer's heads that "
                f"attend local windows; 0: all heads route), got {local_ratio!r}"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"routing (ViT mixer): seed must be an int or None, got {seed!r}")
        # The block validates (and names itself in) the rest; its local heads are sized here, per layer.
        self.holder = BlockHolder(
            "routing", local_heads=0, shared_qk=False, num_clusters=num_clusters, local_window=local_window,
            ema_decay=ema_decay, commitment=commitment, seed=0,
        )  # fmt: skip
        self.local_heads = int(local_ratio * heads)
        self.seed = seed
        means = torch.empty(heads - self.local_heads, num_clusters, self.head_dim)
        self.register_buffer("means", means)
        self.aux_loss = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The block's centroid init: Gaussian directions on the unit sphere, one set per routing head."""
        draw = seeded_normal(tuple(self.means.shape), resolve_seed(self.seed))
        self.means.copy_(F.normalize(draw, dim=-1).to(self.means))

    def patches(self, q, k, v, grid, prefix):
        block = self.holder.get(q.device, self.training)
        hl = self.local_heads
        outs = []
        if hl:
            outs.append(self._local(q[:, :hl], k[:, :hl], v[:, :hl], grid, prefix, block.local_window))
        if hl < self.heads:
            outs.append(self._routed(q[:, hl:], k[:, hl:], v[:, hl:], prefix, block))
        else:
            self.aux_loss = None
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def _local(self, q, k, v, grid, prefix: int, window: int) -> torch.Tensor:
        """Attention within p x p windows (p = ``local_window``, capped at the grid) plus the prefix keys."""
        height, width = grid
        p = min(window, max(height, width))
        wq, wk, wv = (grid_windows(t[:, :, prefix:], grid, p) for t in (q, k, v))
        groups = wq.shape[2]
        if prefix:
            wk = torch.cat([_prefix_per_group(k, prefix, groups), wk], dim=3)
            wv = torch.cat([_prefix_per_group(v, prefix, groups), wv], dim=3)
        mask = None
        if ceil_div(height, p) * p != height or ceil_div(width, p) * p != width:
            valid = F.pad(window_valid(grid, p, q.device), (prefix, 0), value=True)
            # (h*nW, 1, P + p*p): padded slots are never keys; a window's top-left slot is always a patch.
            mask = valid.unsqueeze(1).repeat(q.shape[1], 1, 1)
        out = F.scaled_dot_product_attention(
            wq.flatten(1, 2), wk.flatten(1, 2), wv.flatten(1, 2), attn_mask=mask
        )
        return _from_windows(out.unflatten(1, (q.shape[1], groups)), grid, p)

    def _routed(self, q, k, v, prefix: int, block) -> torch.Tensor:
        """Balanced k-means routing of the patch queries and keys; clusters attend as one batched SDPA."""
        qp, kp, vp = q[:, :, prefix:], k[:, :, prefix:], v[:, :, prefix:]
        b, h, n, d = qp.shape
        nc = block.num_clusters
        w = ceil_div(n, nc)
        # The block's routing space; attention itself keeps the pretrained q and k.
        qu = F.normalize(F.layer_norm(qp, (d,)), dim=-1)
        ku = F.normalize(F.layer_norm(kp, (d,)), dim=-1)
        with torch.no_grad():
            q_scores, k_scores = centroid_scores(qu, self.means), centroid_scores(ku, self.means)
        if self.training:
            q_assign, k_assign = q_scores.argmax(dim=2), k_scores.argmax(dim=2)
            loss = commitment_loss(qu, self.means, q_assign) + commitment_loss(ku, self.means, k_assign)
            self.aux_loss = block.commitment * loss
            # After the scores: this forward routes with the centroids it started with, as the block.
            ema_update_(
                self.means,
                torch.cat([qu, ku], dim=2),
                torch.cat([q_assign, k_assign], dim=2),
                block.ema_decay,
            )
        else:
            self.aux_loss = None
        with torch.no_grad():
            q_idx, k_idx = topw_members(q_scores, w), topw_members(k_scores, w)  # (b, h, nc, w)
        cq = gather_tokens(qp, q_idx)
        ck, cv = gather_tokens(kp, k_idx), gather_tokens(vp, k_idx)
        if prefix:
            ck = torch.cat([_prefix_per_group(k, prefix, nc), ck], dim=3)
            cv = torch.cat([_prefix_per_group(v, prefix, nc), cv], dim=3)
        out = F.scaled_dot_product_attention(cq.flatten(1, 2), ck.flatten(1, 2), cv.flatten(1, 2))
        out = scatter_mean(out.unflatten(1, (h, nc)), q_idx, n)
        if prefix:
            with torch.no_grad():
                taken = torch.zeros(b, h, n, dtype=torch.bool, device=q.device)
                taken.scatter_(-1, q_idx.flatten(2), True)
            alone = F.scaled_dot_product_attention(qp, k[:, :, :prefix], v[:, :, :prefix])
            out = torch.where(taken.unsqueeze(-1), out, alone)
        return out

    def extra_repr(self) -> str:
        return (
            f"local_heads={self.local_heads}, routing_heads={self.heads - self.local_heads}, seed={self.seed}"
        )


class SinkhornCore(MixerCore):
    """Sparse Sinkhorn attention on a ViT: the patch grid is cut into ``window_size`` x ``window_size``
    windows (the block's blocks); each window's queries attend its own keys and the keys of its softly
    sorted window (S·K, values S·V) in one batched SDPA over the pretrained q, k, v. S is the block's
    Gumbel-Sinkhorn balancing (:func:`visattn.attn.sinkhorn.sinkhorn`, Gumbel noise in training only) of
    R_ij = ReLU(SortNet(e_i) · k̄_j / sqrt(d)), the block's scoring against each window's mean key.

    SortNet is the new learned module ``sort_net`` (Linear(C, C), ReLU, Linear(C, C)), keys
    ``sort_net.0.*`` and ``sort_net.2.*``. The block embeds a window by the mean of its input features; the
    core sees no input, so the embedding is the window mean of v with the heads concatenated (C channels):
    v is affine in the layer input and never normalised, so this is the block's input mean through one
    fixed affine map. The paper states no initialisation; :meth:`reset_parameters` gives the block's
    (PyTorch's Linear default, U(±1/sqrt(C)) weights and biases) instead of timm's 0.02-std init.

    Prefix keys: the paper's key set is two halves, the local window and the sorted window; the prefix keys
    join each half (two copies, no mask needed), so that with one window (the sorted window is the window
    itself) the prefix keys keep the relative weight they have in dense attention. Dense limit:
    ``window_size >= max(H, W)`` (one window covering the grid)."""

    def __init__(self, dim: int, heads: int, *, window_size: int = 8, temperature: float = 0.75,
                 sinkhorn_iter: int = 7) -> None:  # fmt: skip
        super().__init__(dim, heads)
        self.holder = BlockHolder(
            "sinkhorn", window_size=window_size, temperature=temperature, sinkhorn_iter=sinkhorn_iter
        )
        self.sort_net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The block's SortNet init (PyTorch's Linear default), replacing timm's."""
        for layer in self.sort_net:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    def sort_matrix(
        self, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], prefix: int
    ) -> torch.Tensor:
        """The window sort matrix S (B, h, nW, nW) of the patch keys and values of (B, h, P + H*W, d) ``k``,
        ``v`` (Gumbel noise in training only). Row i mixes the windows sorted into window i."""
        return self._sort(*self._windows(k, v, grid, prefix), grid)

    def _windows(self, k, v, grid, prefix):
        block = self.holder.get(k.device, self.training)
        p = min(block.window_size, max(grid))
        return grid_windows(k[:, :, prefix:], grid, p), grid_windows(v[:, :, prefix:], grid, p), p, block

    def _sort(self, wk, wv, p: int, block, grid) -> torch.Tensor:
        from ...attn.sinkhorn import sinkhorn

        (height, width), h, d = grid, wk.shape[1], wk.shape[-1]
        gy, gx = ceil_div(height, p), ceil_div(width, p)
        valid = window_valid(grid, p, wk.device)
        k_mean = wk.sum(-2) / valid.sum(-1).clamp_min(1).to(wk.dtype).unsqueeze(-1)  # padding is zero
        vmap = rearrange(wv, "b h (Y X) (y x) d -> b (h d) (Y y) (X x)", X=gx, y=p)
        e = block._window_embedding(vmap, valid, gy, gx)  # (b, nW, C)
        # Under autocast or a model cast as a whole the dtypes agree; a bare mismatch follows the SortNet.
        s_q = rearrange(self.sort_net(e.to(self.sort_net[0].weight.dtype)), "b w (h d) -> b h w d", h=h)
        s_q = s_q.to(k_mean.dtype)
        r = upcast_for_accuracy(F.relu(torch.einsum("bhid,bhjd->bhij", s_q, k_mean) / math.sqrt(d)))
        if self.training:
            u = torch.rand_like(r).clamp(1e-6, 1 - 1e-6)
            r = r - torch.log(-torch.log(u))  # Gumbel noise, as the block
        return sinkhorn(r / block.temperature, block.sinkhorn_iter)

    def patches(self, q, k, v, grid, prefix):
        wk, wv, p, block = self._windows(k, v, grid, prefix)
        s = self._sort(wk, wv, p, block, grid)
        wq = grid_windows(q[:, :, prefix:], grid, p)
        b, h, nw, t, d = wq.shape
        sk = torch.einsum("bhij,bhjtd->bhitd", s.to(wk.dtype), wk)
        sv = torch.einsum("bhij,bhjtd->bhitd", s.to(wv.dtype), wv)  # values sorted as values
        halves_k, halves_v = [wk, sk], [wv, sv]
        if prefix:
            pk, pv = _prefix_per_group(k, prefix, nw), _prefix_per_group(v, prefix, nw)
            halves_k = [pk, wk, pk, sk]
            halves_v = [pv, wv, pv, sv]
        keys, values = torch.cat(halves_k, dim=3), torch.cat(halves_v, dim=3)
        mask = None
        if grid[0] % p or grid[1] % p:
            # The block's bias: padded local keys masked, sorted slots weighted by their real share.
            bias = block._mask(s, window_valid(grid, p, q.device), p).to(q.dtype)  # (b, h, nW, t, 2t)
            if prefix:
                zeros = bias.new_zeros(*bias.shape[:-1], prefix)
                bias = torch.cat([zeros, bias[..., :t], zeros, bias[..., t:]], dim=-1)
            mask = bias.flatten(1, 2)
        out = F.scaled_dot_product_attention(
            wq.flatten(1, 2), keys.flatten(1, 2), values.flatten(1, 2), attn_mask=mask
        )
        return _from_windows(out.unflatten(1, (h, nw)), grid, p)
