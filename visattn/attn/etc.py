"""ETC: Encoding Long and Structured Inputs in Transformers — https://arxiv.org/abs/2004.08483

2D adaptation: the long input is the pixels, the global input one token per P x P patch (the patch mean
plus a learned global embedding, as ETC's one auxiliary token per sentence). l2l is a 2D window of radius r
(out-of-map keys excluded); l2g, g2g and g2l are full. Relative keys (ETC: q · a_label + a per-label bias)
label l2l / g2g pairs by their 2D offset clipped to k per axis and l2g / g2l pairs by "own patch or not", as
ETC links sentences. A single block updates the globals first (g2g + g2l), then the pixels (l2l + l2g read
the updated globals): it can only return the pixels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import (
    AttnBlock,
    factory_kwargs,
    merge_heads,
    resolve_heads,
    split_heads,
    to_tokens,
)
from ..layers.sparse_pattern import (
    Grid,
    Pattern,
    ceil_div,
    crop_to_map,
    flat_meshgrid,
    pad_to_grid,
    segment_coords,
    window_segment,
    window_tile,
    with_shared_keys,
)
from ..layers.sparse_pyramid import attend_with_bias
from ..registry import register_attn


@register_attn(
    "etc",
    title="ETC: Encoding Long and Structured Inputs in Transformers",
    arxiv="2004.08483",
    year=2020,
    family="sparse",
    complexity="O(N·(r² + g)·D + g²·D), g = N/P² global tokens",
    flops_exponent=2.0,
    native_2d=False,
    causal=False,
    identity_init=True,
    idea="global-local attention: one global token per P x P patch (g2g, g2l, l2g full) + l2l local window, "
    "relative positions",
    reference="none",
)
class ETC(AttnBlock):
    """Global-local attention, ``x + proj(attn(x))`` with a zero-initialised projection.

    Args:
        channels: input channels C.
        patch_size: P, one global token per P x P patch.
        local_radius: l2l radius r per axis (ETC: 84 tokens per side, a 169-token window; radius 6 gives the
            same 13 x 13 = 169 keys in 2D).
        relative_max_distance: relative offsets are clipped to this per axis (ETC: k = 12).
        use_global: False leaves l2l alone (no global tokens).
        heads: attention heads (default: ``default_heads(C)``).
        qkv_bias: bias in the q/k/v projections (shared by long and global tokens, as ETC's default).
    """

    def __init__(
        self,
        channels: int,
        *,
        patch_size: int = 8,
        local_radius: int = 6,
        relative_max_distance: int = 12,
        use_global: bool = True,
        heads: int | None = None,
        qkv_bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if patch_size < 1:
            raise ValueError(f"etc: patch_size must be >= 1, got {patch_size}")
        if local_radius < 0:
            raise ValueError(f"etc: local_radius must be >= 0, got {local_radius}")
        if relative_max_distance < 0:
            raise ValueError(f"etc: relative_max_distance must be >= 0, got {relative_max_distance}")
        heads = resolve_heads(channels, heads, "etc")
        dd = factory_kwargs(device, dtype)
        self.patch_size, self.local_radius, self.max_distance = (
            patch_size,
            local_radius,
            relative_max_distance,
        )
        self.use_global, self.heads = use_global, heads
        self.q = nn.Linear(channels, channels, bias=qkv_bias, **dd)
        self.kv = nn.Linear(channels, 2 * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        # Labels: (2k+1)^2 clipped 2D offsets, then "other patch", "own patch" (ETC's l2g / g2l ids).
        labels = (2 * relative_max_distance + 1) ** 2 + 2
        d = channels // heads
        self.rel_long = nn.Parameter(torch.randn(labels, heads, d, **dd) * 0.02)
        self.rel_long_bias = nn.Parameter(torch.zeros(labels, heads, **dd))
        if use_global:
            self.global_embed = nn.Parameter(torch.randn(channels, **dd) * 0.02)
            self.rel_global = nn.Parameter(torch.randn(labels, heads, d, **dd) * 0.02)
            self.rel_global_bias = nn.Parameter(torch.zeros(labels, heads, **dd))
            self.proj_g = nn.Linear(channels, channels, **dd)

    def _offset_label(self, dy: torch.Tensor, dx: torch.Tensor, k: int | None = None) -> torch.Tensor:
        k = self.max_distance if k is None else k
        return (dy.clamp(-k, k) + k) * (2 * k + 1) + dx.clamp(-k, k) + k

    def patches(self, height: int, width: int) -> tuple[int, int]:
        return ceil_div(height, self.patch_size), ceil_div(width, self.patch_size)

    def pattern(self, height: int, width: int, device=None) -> tuple[Pattern, torch.Tensor | None]:
        """(l2l window (+ all globals as extra keys) on the padded grid, (T, Q, g) bool "the global of the
        query's own patch" for the l2g slots, or None without globals)."""
        size = 2 * self.local_radius + 1
        tile = window_tile(size, height, width)
        grid = Grid(ceil_div(height, tile[0]) * tile[0], ceil_div(width, tile[1]) * tile[1], height, width)
        seg = window_segment(grid, size, tile=tile, device=device)
        if not self.use_global:
            return Pattern(grid, (seg,)), None
        gh, gw = self.patches(height, width)
        seg = with_shared_keys(seg, torch.arange(grid.n, grid.n + gh * gw, device=device))
        qr = seg.queries.div(grid.cols, rounding_mode="floor")
        qc = seg.queries - qr * grid.cols
        patch = (qr // self.patch_size).clamp(max=gh - 1) * gw + (qc // self.patch_size).clamp(max=gw - 1)
        own = patch[:, :, None] == torch.arange(gh * gw, device=device)
        return Pattern(grid, (seg,), extra=gh * gw), own

    def window_labels(self, height: int, width: int, device=None) -> torch.Tensor:
        """(Q, K) l2l offset labels of a window tile's slots. They are the same for every tile, so they are
        read off an interior tile of a grid large enough to hold its whole halo."""
        size, r = 2 * self.local_radius + 1, self.local_radius
        th, tw = window_tile(size, height, width)
        mh, mw = -(-r // th), -(-r // tw)
        grid = Grid((2 * mh + 1) * th, (2 * mw + 1) * tw)
        (qr, qc), (kr, kc) = segment_coords(grid, window_segment(grid, size, tile=(th, tw), device=device))
        t = mh * (2 * mw + 1) + mw
        return self._offset_label(kr[t][None, :] - qr[t][:, None], kc[t][None, :] - qc[t][:, None])

    def global_labels(self, height: int, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """((g, g) g2g labels (clipped patch offsets), (g, H*W) bool g2l "pixel in the global's patch")."""
        gh, gw = self.patches(height, width)
        ar = lambda n: torch.arange(n, device=device)  # noqa: E731
        gy, gx = flat_meshgrid(gh, gw, device=device)
        g2g = self._offset_label(gy[None, :] - gy[:, None], gx[None, :] - gx[:, None])
        py, px = flat_meshgrid(height, width, device=device)
        own = (py // self.patch_size) * gw + px // self.patch_size
        return g2g, own[None, :] == ar(gh * gw)[:, None]

    def global_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Globals after g2g + g2l: patch means + global embedding, then attention over [globals; pixels]."""
        b, c, h, w = x.shape
        p = self.patch_size
        gh, gw = self.patches(h, w)
        xp = pad_to_grid(x, gh * p, gw * p)
        ones = pad_to_grid(x.new_ones(1, 1, h, w), gh * p, gw * p)
        mean = F.avg_pool2d(xp, p) / F.avg_pool2d(ones, p)  # mean over the real pixels of each patch
        g0 = to_tokens(mean) + self.global_embed
        t = to_tokens(x)
        q = self.q(g0)
        k, v = self.kv(torch.cat([g0, t], dim=1)).chunk(2, dim=-1)
        qh = split_heads(q, self.heads)  # (B, heads, g, d)
        scale = qh.shape[-1] ** -0.5
        link = (2 * self.max_distance + 1) ** 2
        qa = torch.einsum("bhgd,rhd->bhgr", qh, self.rel_global) + self.rel_global_bias.t()[None, :, None, :]
        g2g, own = self.global_labels(h, w, x.device)
        g2g = qa.gather(3, g2g[None, None].expand(b, self.heads, -1, -1))
        other = qa[..., link : link + 1]
        g2l = other + (qa[..., link + 1 : link + 2] - other) * own  # two labels: no gather over the pixels
        bias = torch.cat([g2g, g2l], dim=-1) * scale
        out = F.scaled_dot_product_attention(
            qh, split_heads(k, self.heads), split_heads(v, self.heads), attn_mask=bias
        )
        return g0 + self.proj_g(merge_heads(out))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pattern, own = self.pattern(h, w, x.device)
        grid = pattern.grid
        t = to_tokens(pad_to_grid(x, grid.rows, grid.cols))
        context = torch.cat([t, self.global_tokens(x)], dim=1) if self.use_global else t
        q = self.q(t)
        k, v = self.kv(context).chunk(2, dim=-1)
        heads = self.heads
        # ETC's relative keys q · a_label + bias_label. The l2l labels are tile-independent, so the gathered
        # embeddings are (Q, K, heads, d) and the scores one batched matmul (no per-slot gather).
        qt = rearrange(q, "b n (h d) -> n b h d", h=heads)[pattern.segments[0].queries]  # (T, Q, B, h, d)
        labels = self.window_labels(h, w, x.device)
        bias = torch.einsum("tqbhd,qkhd->tbhqk", qt, self.rel_long[labels])
        bias = bias + rearrange(self.rel_long_bias[labels], "q k h -> h q k")
        if own is not None:
            link = (2 * self.max_distance + 1) ** 2
            qa = torch.einsum("tqbhd,rhd->tbhqr", qt, self.rel_long[link : link + 2])
            qa = qa + rearrange(self.rel_long_bias[link : link + 2], "r h -> h 1 r")
            other = qa[..., :1]
            bias = torch.cat([bias, other + (qa[..., 1:] - other) * own[:, None, None]], dim=-1)
        bias = rearrange(bias, "t b h q k -> t (b h) q k") * (self.channels // heads) ** -0.5
        out = self.proj(attend_with_bias(q, k, v, pattern, self.heads, bias))
        return x + crop_to_map(out, grid, h, w)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, patch_size={self.patch_size}, local_radius={self.local_radius}, "
            f"relative_max_distance={self.max_distance}, use_global={self.use_global}"
        )
