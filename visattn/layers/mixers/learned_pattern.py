"""Mixer cores whose key sets or scores carry learned parts of their own (new parameters beside a ViT's
pretrained q, k, v): ETC's per-cell global tokens and relative-position keys, SAC's edge predictor.

Both reuse their CNN block's definitions (:mod:`visattn.attn.etc`, :mod:`visattn.attn.sac`) by calling the
block's methods on the core, which carries the same hyperparameter attributes: labels, patterns and
candidate edges are defined once, in the block."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..gather_attention import gather_attend
from ..sparse_pattern import pad_to_grid, with_shared_keys
from ..sparse_pyramid import attend_with_bias
from .base import BlockHolder, MixerCore

__all__ = ["EtcCore", "SacCore"]

# ETC's (and BERT's) initializer_range: the std of its learned embeddings.
_INIT_STD = 0.02


class EtcCore(MixerCore):
    """ETC's global-local attention on the patch grid, as the block :class:`visattn.attn.etc.ETC` runs it.

    Globals: one per ``patch_size`` x ``patch_size`` cell of patches, its q/k/v the mean of the cell's
    pretrained q/k/v plus a learned global embedding (``global_qkv``: the block's ``global_embed`` taken in
    q/k/v space; timm's qkv is affine, so the mean of the projections is the projection of the mean). As in
    the block, one layer first updates the globals (g2g + g2l: they attend the globals, patches and prefix
    tokens, with relative keys ``rel_global``; the update ``global_update`` is the block's ``proj_g``
    followed by the layer's k/v projection), then every patch attends its (2r+1)^2 window (l2l), all
    globals (l2g) and the prefix tokens in one softmax, with ETC's relative keys ``q · a_label + b_label``
    (``rel_long``): clipped 2D offsets in the window, "own cell or not" towards the globals. The prefix
    tokens (class, registers) are ETC global tokens that carry from layer to layer; they have no relative
    label (a pretrained ViT gives them none). Dense limit: ``use_global=False`` with ``local_radius >=
    max(H, W) - 1`` and the relative embeddings at zero.
    """

    def __init__(self, dim: int, heads: int, *, patch_size: int = 8, local_radius: int = 6,
                 relative_max_distance: int = 12, use_global: bool = True) -> None:  # fmt: skip
        super().__init__(dim, heads)
        # The block validates the hyperparameters (its errors name "etc" and the bound) and defines the
        # cells, the window pattern and the relative labels, used through the holder.
        self.holder = BlockHolder(
            "etc",
            patch_size=patch_size,
            local_radius=local_radius,
            relative_max_distance=relative_max_distance,
            use_global=use_global,
        )
        self.patch_size, self.local_radius = patch_size, local_radius
        self.max_distance, self.use_global = relative_max_distance, use_global
        labels = (2 * relative_max_distance + 1) ** 2 + 2
        d = self.head_dim
        self.rel_long = nn.Parameter(torch.empty(labels, heads, d))
        self.rel_long_bias = nn.Parameter(torch.empty(labels, heads))
        if use_global:
            self.global_qkv = nn.Parameter(torch.empty(3, heads, d))
            self.rel_global = nn.Parameter(torch.empty(labels, heads, d))
            self.rel_global_bias = nn.Parameter(torch.empty(labels, heads))
            self.global_update = nn.Linear(dim, 2 * dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ETC's init (initializer_range 0.02) for the relative and global embeddings, zero label biases;
        the global update keeps PyTorch's Linear init, as the block's ``proj_g`` (ETC gives none)."""
        nn.init.normal_(self.rel_long, std=_INIT_STD)
        nn.init.zeros_(self.rel_long_bias)
        if self.use_global:
            nn.init.normal_(self.global_qkv, std=_INIT_STD)
            nn.init.normal_(self.rel_global, std=_INIT_STD)
            nn.init.zeros_(self.rel_global_bias)
            self.global_update.reset_parameters()

    def _cell_means(self, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, h, H*W, d) patch tensors -> (B, h, g, d) means over the real patches of each cell."""
        p = self.patch_size
        gh, gw = self.holder.block.patches(height, width)
        m = rearrange(t, "b h (y x) d -> b (h d) y x", y=height)
        ones = pad_to_grid(m.new_ones(1, 1, height, width), gh * p, gw * p)
        mean = F.avg_pool2d(pad_to_grid(m, gh * p, gw * p), p) / F.avg_pool2d(ones, p)
        return rearrange(mean, "b (h d) y x -> b h (y x) d", h=self.heads)

    def _globals(self, q, k, v, height: int, width: int, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, h, g, d) of the globals after their g2g + g2l update."""
        body = slice(prefix, None)
        qg, kg, vg = (self._cell_means(t[:, :, body], height, width) + e[:, None] for t, e in
                      zip((q, k, v), self.global_qkv, strict=True))  # fmt: skip
        b, h, g, _ = qg.shape
        link = (2 * self.max_distance + 1) ** 2
        qa = torch.einsum("bhgd,rhd->bhgr", qg, self.rel_global) + self.rel_global_bias.t()[None, :, None]
        g2g, own = self.holder.block.global_labels(height, width, q.device)
        other = qa[..., link : link + 1]
        bias = torch.cat(
            [
                qa.gather(3, g2g[None, None].expand(b, h, -1, -1)),
                other + (qa[..., link + 1 : link + 2] - other) * own,
                qa.new_zeros(b, h, g, prefix),  # the prefix keys carry no label
            ],
            dim=-1,
        )
        keys = torch.cat([kg, k[:, :, body], k[:, :, :prefix]], dim=2)
        values = torch.cat([vg, v[:, :, body], v[:, :, :prefix]], dim=2)
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=bias * self.head_dim**-0.5)
        dk, dv = self.global_update(rearrange(out, "b h g d -> b g (h d)")).chunk(2, dim=-1)
        split = lambda t: rearrange(t, "b g (h d) -> b h g d", h=h)  # noqa: E731
        return kg + split(dk), vg + split(dv)

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        b, h, _, d = q.shape
        block = self.holder.block
        pattern, own = block.pattern(height, width, q.device)
        g = pattern.extra
        pg = pattern.grid
        seg = pattern.segments[0]
        if prefix:  # the prefix tokens sit after the globals in the key table
            extra = torch.arange(pg.n + g, pg.n + g + prefix, device=q.device)
            seg = with_shared_keys(seg, extra)
            pattern = pattern._replace(segments=(seg,), extra=g + prefix)

        def to_grid(t):
            m = rearrange(t[:, :, prefix:], "b h (y x) d -> b (h d) y x", y=height)
            return rearrange(pad_to_grid(m, pg.rows, pg.cols), "b c y x -> b (y x) c")

        flat = lambda t: rearrange(t, "b h n d -> b n (h d)")  # noqa: E731
        parts_k, parts_v = [to_grid(k)], [to_grid(v)]
        if self.use_global:
            kg, vg = self._globals(q, k, v, height, width, prefix)
            parts_k.append(flat(kg))
            parts_v.append(flat(vg))
        parts_k.append(flat(k[:, :, :prefix]))
        parts_v.append(flat(v[:, :, :prefix]))
        qg = to_grid(q)

        # ETC's relative keys, as the block scores them: window labels are the same for every tile.
        qt = rearrange(qg, "b n (h d) -> n b h d", h=h)[seg.queries]  # (T, Q, B, h, d)
        labels = block.window_labels(height, width, q.device)
        bias = torch.einsum("tqbhd,qkhd->tbhqk", qt, self.rel_long[labels])
        bias = bias + rearrange(self.rel_long_bias[labels], "q k h -> h q k")
        extra_bias = []
        if own is not None:
            link = (2 * self.max_distance + 1) ** 2
            qa = torch.einsum("tqbhd,rhd->tbhqr", qt, self.rel_long[link : link + 2])
            qa = qa + rearrange(self.rel_long_bias[link : link + 2], "r h -> h 1 r")
            other = qa[..., :1]
            extra_bias.append(other + (qa[..., 1:] - other) * own[:, None, None])
        if prefix:
            extra_bias.append(bias.new_zeros(*bias.shape[:-1], prefix))
        bias = torch.cat([bias, *extra_bias], dim=-1)
        bias = rearrange(bias, "t b h q k -> t (b h) q k") * d**-0.5
        out = attend_with_bias(qg, torch.cat(parts_k, 1), torch.cat(parts_v, 1), pattern, h, bias)
        out = rearrange(out, "b (y x) (h d) -> b h y x d", y=pg.rows, h=h)[:, :, :height, :width]
        return out.reshape(b, h, height * width, d)


class _PairContent(nn.Module):
    """SAC's content embeddings e_q, e_k of the edge predictor, read from the layer's queries and keys:
    ``forward(cat([q, k], -1))`` -> ``cat([e_q(q), e_k(k)], -1)``, the layout the block's
    :meth:`~visattn.attn.sac.SAC.edge_logits` splits."""

    def __init__(self, dim: int, edge_dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.query = nn.Linear(dim, edge_dim)
        self.key = nn.Linear(dim, edge_dim)

    def forward(self, qk: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.query(qk[..., : self.dim]), self.key(qk[..., self.dim :])], dim=-1)


class SacCore(MixerCore):
    """SAC's sparse adaptive connection over the patch grid, as :class:`visattn.attn.sac.SAC` runs it: the
    block's candidate edges of every patch (its (2r+1)^2 window and a grid of far anchors) are scored by a
    new edge predictor (the block's distance-encoding MLP plus a content term ``e_q(q_p) · e_k(k_j)``, read
    from the layer's pretrained queries and keys, all heads together), the ``alpha`` best become the patch's
    edges, and softmax attention over those edges and the prefix tokens (always in the key set) uses the
    pretrained q, k, v. The hard choice trains the predictor through the block's straight-through gate
    (exactly 1 in the forward pass). Dense limit: ``window >= max(H, W) - 1`` and ``alpha >= H * W``.
    """

    def __init__(self, dim: int, heads: int, *, alpha: int = 16, window: int = 3, anchors: int = 8,
                 edge_dim: int = 8, hidden: int = 32, freqs: int = 4) -> None:  # fmt: skip
        super().__init__(dim, heads)
        BlockHolder(
            "sac", alpha=alpha, window=window, anchors=anchors, edge_dim=edge_dim, hidden=hidden, freqs=freqs
        )
        # Attribute names of the SAC block, so its candidate and predictor methods run on this core.
        self.alpha, self.window, self.anchors = alpha, window, anchors
        self.edge_dim, self.freqs = edge_dim, freqs
        self.edge_content = _PairContent(dim, edge_dim)
        self.edge_mlp = nn.Sequential(nn.Linear(2 + 4 * freqs, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def candidates(self, height: int, width: int, device=None):
        """The block's candidate edges (key ids, offset-table ids, validity), read by its ``edge_logits``."""
        from ...attn.sac import SAC

        return SAC.candidates(self, height, width, device)

    def reset_parameters(self) -> None:
        """PyTorch's Linear init, as the block's predictor (the paper states none for its LSTM predictor)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def patches(self, q, k, v, grid, prefix):
        from ...attn.sac import SAC

        height, width = grid
        b, h, _, d = q.shape
        merged = lambda t: rearrange(t[:, :, prefix:], "b h n d -> b n (h d)")  # noqa: E731
        logits, key = SAC.edge_logits(self, torch.cat([merged(q), merged(k)], dim=-1), height, width)
        top, pick = logits.topk(min(self.alpha, logits.shape[-1]), dim=-1)  # (B, N, alpha)
        edges = key.unsqueeze(0).expand(b, -1, -1).gather(-1, pick) + prefix
        chosen = torch.isfinite(top)
        soft = torch.sigmoid(top.masked_fill(~chosen, 0.0))
        gate = 1.0 + (soft - soft.detach())  # the block's straight-through gate: 1 forward
        n = height * width
        fixed = torch.arange(prefix, device=q.device).expand(b, n, prefix)
        index = torch.cat([fixed, edges], dim=-1).unsqueeze(1).expand(-1, h, -1, -1)
        mask = torch.cat([chosen.new_ones(b, n, prefix), chosen], dim=-1).unsqueeze(1)
        scale = torch.cat([gate.new_ones(b, n, prefix), gate], dim=-1).unsqueeze(1)
        return gather_attend(q[:, :, prefix:], k, v, index, mask=mask, value_scale=scale)
