"""Functional cores of the token-mixing methods on given queries, keys and values.

A core takes per-head ``q, k, v`` of shape ``(B, h, P + H*W, d)``: ``P`` prefix tokens (a ViT's class and
register tokens) first, then the patch tokens of an ``H x W`` grid in raster order, and returns the attended
values in the same layout. It adds no projection of its own, so a ViT's pretrained q/k/v/proj are used as
they are (see :mod:`visattn.models.vit`). Every core follows one rule for the prefix tokens: they are
global tokens, so each prefix query attends every token exactly (dense softmax, O(P·N)), and every patch
query has the prefix keys in its key set (one joint softmax with the method's own keys; for methods made of
two sequential steps, in the last step).

Each core calls one of the shared engines: :func:`visattn.layers.sparse_pattern.sparse_attention` (fixed key
sets: windows, criss-cross, strided patterns), grouped ``scaled_dot_product_attention`` (axial, interlaced),
:func:`visattn.layers.linear_attention.linear_attention` with a kernel feature map (linear, Performer),
the Nyström product (landmarks), and sort-based LSH clustering (SMYRF).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .hashing import (
    attend_lse,
    e2lsh_project,
    gather_tokens,
    merge_rounds,
    seeded_normal,
    seeded_uniform,
    sort_with_inverse,
    stable_argsort,
    xbox_plus,
)
from .linear_attention import (
    elu_feature_map,
    favor_plus_features,
    linear_attention,
    orthogonal_gaussian,
    trig_random_features,
)
from .padding import ceil_div
from .sparse_pattern import (
    Grid,
    Pattern,
    column_segment,
    row_segment,
    sparse_attention,
    window_segment,
    window_tile,
    with_shared_keys,
)

__all__ = [
    "MixerCore",
    "DenseCore",
    "WindowCore",
    "CrissCrossCore",
    "AxialCore",
    "InterlacedCore",
    "RasterPatternCore",
    "KernelCore",
    "NystromCore",
    "SmyrfCore",
    "prefix_dense",
]


def prefix_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int) -> torch.Tensor:
    """Exact softmax attention of the ``prefix`` first queries over every key: (B, h, P, d)."""
    return F.scaled_dot_product_attention(q[:, :, :prefix], k, v)


class MixerCore(nn.Module):
    """Base of the cores: ``forward(q, k, v, grid, prefix)`` on (B, h, P + H*W, d) tensors.

    Subclasses implement ``patches(q, k, v, grid, prefix)`` -> (B, h, H*W, d), the outputs of the patch
    queries; the prefix queries are dense here. ``dim`` and ``heads`` let a core size its buffers.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], prefix: int
    ) -> torch.Tensor:
        out = self.patches(q, k, v, grid, prefix)
        if prefix:
            out = torch.cat([prefix_dense(q, k, v, prefix), out], dim=2)
        return out

    def patches(self, q, k, v, grid, prefix):  # pragma: no cover - abstract
        raise NotImplementedError


class DenseCore(MixerCore):
    """Softmax attention over all tokens: timm's own attention (the reference of every other core)."""

    def forward(self, q, k, v, grid, prefix):
        return F.scaled_dot_product_attention(q, k, v)


# ------------------------------------------------------------------------------ the pattern engine


def _pattern_qkv(q, k, v, grid_hw, prefix, pattern: Pattern, place: torch.Tensor) -> torch.Tensor:
    """Patch queries through :func:`sparse_attention`: the patch tokens are put at grid positions ``place``
    (H*W,) of ``pattern.grid`` (other positions are padding, never valid keys), the prefix tokens are the
    pattern's extra keys. Returns (B, h, H*W, d)."""
    b, h, _, d = q.shape
    n = pattern.grid.n
    heads = h

    def to_grid(t):
        body = t[:, :, prefix:]
        full = body.new_zeros(b, h, n, d).index_copy(2, place, body)
        return rearrange(full, "b h n d -> b n (h d)")

    qg = to_grid(q)
    kg = torch.cat([to_grid(k), rearrange(k[:, :, :prefix], "b h n d -> b n (h d)")], dim=1)
    vg = torch.cat([to_grid(v), rearrange(v[:, :, :prefix], "b h n d -> b n (h d)")], dim=1)
    out = sparse_attention(qg, kg, vg, pattern, heads)
    return rearrange(out, "b n (h d) -> b h n d", h=heads).index_select(2, place)


def _image_place(height: int, width: int, cols: int, device) -> torch.Tensor:
    """Grid positions of the H x W patch tokens on a padded grid of ``cols`` columns."""
    r = torch.arange(height, device=device)[:, None]
    c = torch.arange(width, device=device)[None, :]
    return (r * cols + c).reshape(-1)


def _with_prefix(pattern: Pattern, prefix: int) -> Pattern:
    """``pattern`` with ``prefix`` extra (global) keys shared by every query of its first segment."""
    if not prefix:
        return pattern
    first, *rest = pattern.segments
    extra = torch.arange(pattern.grid.n, pattern.grid.n + prefix, device=first.keys.device)
    return pattern._replace(segments=(with_shared_keys(first, extra), *rest), extra=prefix)


class WindowCore(MixerCore):
    """Longformer's 2D sliding window: a ``kernel_size`` x ``kernel_size`` (dilated) window around every
    patch, plus the prefix tokens as the global tokens. Dense limit: ``kernel_size >= 2 * max(H, W) - 1``."""

    def __init__(self, dim: int, heads: int, *, kernel_size: int = 15, dilation: int = 1) -> None:
        super().__init__(dim, heads)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"longformer (ViT mixer): kernel_size must be odd and >= 1, got {kernel_size}")
        if dilation < 1:
            raise ValueError(f"longformer (ViT mixer): dilation must be >= 1, got {dilation}")
        self.kernel_size, self.dilation = kernel_size, dilation

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        tile = window_tile(self.kernel_size, height, width, self.dilation)
        rows = ceil_div(height, tile[0] * self.dilation) * tile[0] * self.dilation
        cols = ceil_div(width, tile[1] * self.dilation) * tile[1] * self.dilation
        g = Grid(rows, cols, height=height, width=width)
        seg = window_segment(g, self.kernel_size, self.dilation, tile=tile, device=q.device)
        pattern = _with_prefix(Pattern(g, (seg,)), prefix)
        return _pattern_qkv(q, k, v, grid, prefix, pattern, _image_place(height, width, cols, q.device))


class CrissCrossCore(MixerCore):
    """CCNet's criss-cross key set: the row and the column of every patch (itself once) and the prefix
    tokens, under one softmax (one recurrence: a ViT stacks layers instead)."""

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        g = Grid(height, width)
        segs = (row_segment(g, device=q.device), column_segment(g, min_row_distance=1, device=q.device))
        pattern = _with_prefix(Pattern(g, segs), prefix)
        return _pattern_qkv(q, k, v, grid, prefix, pattern, _image_place(height, width, width, q.device))


class RasterPatternCore(MixerCore):
    """Sparse Transformer's strided or fixed pattern on the raster sequence of patches, built by the block's
    own :meth:`visattn.attn.sparse_transformer.SparseTransformer.pattern`. Dense limit: ``stride >= H*W``."""

    def __init__(self, dim: int, heads: int, *, pattern: str = "strided", stride: int | None = None,
                 summary: int = 8) -> None:  # fmt: skip
        super().__init__(dim, heads)
        if pattern not in ("strided", "fixed"):
            raise ValueError(
                f"sparse_transformer (ViT mixer): pattern must be 'strided' or 'fixed', got {pattern!r}"
            )
        if stride is not None and stride < 1:
            raise ValueError(f"sparse_transformer (ViT mixer): stride must be None or >= 1, got {stride}")
        self.kind, self.stride, self.summary, self.causal = pattern, stride, summary, False

    def patches(self, q, k, v, grid, prefix):
        from ..attn.sparse_transformer import SparseTransformer  # the block owns the pattern's definition

        height, width = grid
        pattern = _with_prefix(SparseTransformer.pattern(self, height, width, q.device), prefix)
        place = torch.arange(height * width, device=q.device)
        return _pattern_qkv(q, k, v, grid, prefix, pattern, place)


# ------------------------------------------------------------------------- grouped SDPA (two steps)


def _keys_with_prefix(kt, vt, k, v, prefix, groups):
    """Append the prefix keys/values (B, h, P, d) to grouped keys (B*groups, h, L, d)."""
    if not prefix:
        return kt, vt
    kp = k[:, :, :prefix].repeat_interleave(groups, dim=0)
    vp = v[:, :, :prefix].repeat_interleave(groups, dim=0)
    return torch.cat([kt, kp], dim=2), torch.cat([vt, vp], dim=2)


class AxialCore(MixerCore):
    """Axial attention: attention along each row, then along each column over the row step's outputs
    (two hops reach every patch); the prefix keys join the column step."""

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        b = q.shape[0]
        qm, km, vm = (rearrange(t[:, :, prefix:], "b h (y x) d -> b h y x d", y=height) for t in (q, k, v))
        rows = F.scaled_dot_product_attention(
            *(rearrange(t, "b h y x d -> (b y) h x d") for t in (qm, km, vm))
        )
        rows = rearrange(rows, "(b y) h x d -> b h y x d", b=b)
        qc, kc, vc = (rearrange(t, "b h y x d -> (b x) h y d") for t in (qm, km, rows))
        kc, vc = _keys_with_prefix(kc, vc, k, v, prefix, width)
        out = F.scaled_dot_product_attention(qc, kc, vc)
        return rearrange(out, "(b x) h y d -> b h (y x) d", b=b)


class InterlacedCore(MixerCore):
    """ISA: attention among the patches at the same offset of every ``P_h x P_w`` block (long range), then
    among the patches of each block over those outputs (short range, with the prefix keys). The grid is
    padded centred as ISA does, but padded positions are masked as keys (they are not tokens). Dense limit:
    a block covering the grid (``down_factor >= (H, W)``)."""

    def __init__(self, dim: int, heads: int, *, down_factor: int | tuple[int, int] = (8, 8)) -> None:
        super().__init__(dim, heads)
        df = (down_factor, down_factor) if isinstance(down_factor, int) else tuple(down_factor)
        if len(df) != 2 or min(df) < 1:
            raise ValueError(
                f"isa (ViT mixer): down_factor must be an int or a pair >= 1, got {down_factor!r}"
            )
        self.down_factor = df

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        b = q.shape[0]
        ph, pw = min(self.down_factor[0], height), min(self.down_factor[1], width)
        hp, wp = ceil_div(height, ph) * ph, ceil_div(width, pw) * pw
        top, left = (hp - height) // 2, (wp - width) // 2
        pads = (0, 0, left, wp - width - left, top, hp - height - top)
        qm, km, vm = (
            F.pad(rearrange(t[:, :, prefix:], "b h (y x) d -> b h y x d", y=height), pads) for t in (q, k, v)
        )
        valid = F.pad(torch.ones(height, width, dtype=torch.bool, device=q.device), pads[2:], value=False)
        long_ = "b h (gy py) (gx px) d -> (b py px) h (gy gx) d"
        mask = rearrange(valid, "(gy py) (gx px) -> (py px) 1 1 (gy gx)", py=ph, px=pw).repeat(b, 1, 1, 1)
        out1 = F.scaled_dot_product_attention(
            *(rearrange(t, long_, py=ph, px=pw) for t in (qm, km, vm)), attn_mask=mask
        )
        out1 = rearrange(out1, "(b py px) h (gy gx) d -> b h (gy py) (gx px) d", b=b, py=ph, gy=hp // ph)
        short = "b h (gy py) (gx px) d -> (b gy gx) h (py px) d"
        groups = (hp // ph) * (wp // pw)
        qs, ks, vs = (rearrange(t, short, py=ph, px=pw) for t in (qm, km, out1))
        ks, vs = _keys_with_prefix(ks, vs, k, v, prefix, groups)
        mask = rearrange(valid, "(gy py) (gx px) -> (gy gx) 1 1 (py px)", py=ph, px=pw)
        mask = F.pad(mask, (0, prefix), value=True).repeat(b, 1, 1, 1)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
        out = rearrange(out, "(b gy gx) h (py px) d -> b h (gy py) (gx px) d", b=b, gy=hp // ph, py=ph)
        out = out[:, :, top : top + height, left : left + width]
        return rearrange(out, "b h y x d -> b h (y x) d")


# ------------------------------------------------------------------------------ linear attention


class KernelCore(MixerCore):
    """Linear attention φ(q)(φ(k)ᵀv) of every patch over all tokens (prefix included), with the kernel of
    the method: ``elu`` (Katharopoulos et al.), ``favor+`` (Performer: positive orthogonal random
    features of softmax's kernel exp(q·k/√d)), ``trig`` (Performer v1), ``efficient`` (Efficient
    Attention: softmax of q over its channels, of k over the tokens), ``dpfp`` (DPFP's deterministic
    features with the sum update of linear attention; the delta-rule update is sequential). The random projection is a
    non-persistent buffer drawn from ``seed``: a checkpoint never holds it and every run rebuilds it."""

    def __init__(self, dim: int, heads: int, *, kernel: str, num_features: int | None = None,
                 seed: int = 0, nu: int = 1) -> None:  # fmt: skip
        super().__init__(dim, heads)
        self.kernel, self.nu = kernel, nu
        if kernel == "dpfp" and (isinstance(nu, bool) or not isinstance(nu, int) or nu < 1):
            raise ValueError(f"dpfp (ViT mixer): nu must be a positive int, got {nu!r}")
        if kernel in ("favor+", "trig"):
            d = self.head_dim
            m = max(1, int(d * math.log(d))) if num_features is None else num_features
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise ValueError(f"ViT mixer ({kernel}): num_features must be a positive int, got {m!r}")
            gen = torch.Generator().manual_seed(seed)
            self.register_buffer("projection", orthogonal_gaussian(m, d, generator=gen), persistent=False)
            self.num_features = m

    def patches(self, q, k, v, grid, prefix):
        qp = q[:, :, prefix:]
        if self.kernel == "elu":
            fq, fk = elu_feature_map(qp), elu_feature_map(k)
        elif self.kernel == "favor+":
            fq, fk, _ = favor_plus_features(qp, k, self.projection)
        elif self.kernel == "trig":
            fq, fk, _ = trig_random_features(qp, k, self.projection)
        elif self.kernel == "dpfp":
            from ..attn.dpfp import dpfp_features  # the block owns the feature map

            fq, fk = dpfp_features(qp, self.nu), dpfp_features(k, self.nu)
        else:  # efficient: both normalisations are softmaxes, so no denominator is needed
            fq, fk = qp.softmax(dim=-1), k.softmax(dim=-2)
            return fq @ (fk.transpose(-1, -2) @ v)
        return linear_attention(fq, fk, v)


# ---------------------------------------------------------------------------------- landmarks


class NystromCore(MixerCore):
    """Nyström approximation softmax(Q K̃ᵀ) pinv(softmax(Q̃ K̃ᵀ)) softmax(Q̃ Kᵀ) V with landmarks = the cell
    means of the patch q/k over an (lh, lw) grid (:func:`visattn.attn.nystrom.cell_means`) plus the prefix
    tokens. ``pinv_iterations=None`` uses an exact pseudo-inverse. The paper's depthwise conv skip on V is a
    new parameter that would change the pretrained function, so the mixer leaves it out. Dense limit:
    a landmark grid at least the patch grid (capped at it: every patch is a landmark), with the exact
    pseudo-inverse."""

    def __init__(self, dim: int, heads: int, *, landmarks: int | tuple[int, int] = 64,
                 pinv_iterations: int | None = 6) -> None:  # fmt: skip
        super().__init__(dim, heads)
        if isinstance(landmarks, int):
            side = math.isqrt(max(landmarks, 0))
            if landmarks < 1 or side * side != landmarks:
                raise ValueError(f"nystrom (ViT mixer): landmarks must be a perfect square, got {landmarks}")
            landmarks = (side, side)
        self.grid = tuple(landmarks)
        self.pinv_iterations = pinv_iterations

    def patches(self, q, k, v, grid, prefix):
        from ..attn.nystrom import cell_means, newton_schulz_pinv

        height, width = grid
        # More cells than patches along an axis would repeat patches as landmarks: they add nothing and make
        # the landmark kernel singular, so the landmark grid is capped at the patch grid.
        cells_hw = (min(self.grid[0], height), min(self.grid[1], width))

        def landmarks(t):
            cells = cell_means(rearrange(t[:, :, prefix:], "b h (y x) d -> b h d y x", y=height), cells_hw)
            return torch.cat([t[:, :, :prefix], rearrange(cells, "b h d y x -> b h (y x) d")], dim=2)

        q_land, k_land = landmarks(q), landmarks(k)
        scale = q.shape[-1] ** -0.5
        acc = torch.promote_types(q.dtype, torch.float32)
        kernel_3_v = F.scaled_dot_product_attention(q_land, k, v).to(acc)
        kernel_2 = (q_land @ k_land.transpose(-1, -2) * scale).to(acc).softmax(dim=-1)
        if self.pinv_iterations is None:
            pinv = torch.linalg.pinv(kernel_2)
        else:
            pinv = newton_schulz_pinv(kernel_2, self.pinv_iterations)
        middle = (pinv @ kernel_3_v).to(v.dtype)
        return F.scaled_dot_product_attention(q[:, :, prefix:], k_land, middle)


# ---------------------------------------------------------------------------------- hashing


class SmyrfCore(MixerCore):
    """SMYRF: per head and round, XBOX+ transforms of the patch q and k, E2LSH values sorted and cut into
    clusters of ``cluster_size``; each query cluster attends its key cluster plus the prefix keys, rounds
    merged by logsumexp. Hash parameters are non-persistent buffers drawn from ``seed``. Dense limit:
    ``cluster_size >= H*W`` (one cluster)."""

    def __init__(self, dim: int, heads: int, *, n_hashes: int = 4, cluster_size: int = 32,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__(dim, heads)
        for name, value in (("n_hashes", n_hashes), ("cluster_size", cluster_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"smyrf (ViT mixer): {name} must be a positive int, got {value!r}")
        self.n_hashes, self.cluster_size = n_hashes, cluster_size
        self.register_buffer(
            "alpha", seeded_normal((heads, self.head_dim + 2, n_hashes), seed), persistent=False
        )
        self.register_buffer("beta", seeded_uniform((heads, 1, n_hashes), seed + 1), persistent=False)

    def patches(self, q, k, v, grid, prefix):
        qp, kp, vp = q[:, :, prefix:], k[:, :, prefix:], v[:, :, prefix:]
        n = qp.shape[2]
        c = min(self.cluster_size, n)
        n_pad = ceil_div(n, c) * c
        if n_pad > n:
            qp, kp, vp = (F.pad(t, (0, 0, 0, n_pad - n)) for t in (qp, kp, vp))
        valid = torch.arange(n_pad, device=q.device) < n
        with torch.no_grad():
            fq, gk = xbox_plus(qp, kp, valid)
            hq = e2lsh_project(fq, self.alpha, self.beta).masked_fill(~valid, float("inf"))
            hk = e2lsh_project(gk, self.alpha, self.beta).masked_fill(~valid, float("inf"))
            q_perm, q_inv = sort_with_inverse(hq)
            k_perm = stable_argsort(hk)
            key_ok = (k_perm < n).unflatten(-1, (-1, c)).unsqueeze(-2)
        scale = q.shape[-1] ** -0.5
        sq = gather_tokens(qp * scale, q_perm).unflatten(3, (-1, c))  # (b, h, R, clusters, c, d)
        sk = gather_tokens(kp, k_perm).unflatten(3, (-1, c))
        sv = gather_tokens(vp, k_perm).unflatten(3, (-1, c))
        dots = torch.einsum("...id,...jd->...ij", sq, sk).masked_fill(~key_ok, float("-inf"))
        if prefix:
            pre = torch.einsum("bhrgid,bhjd->bhrgij", sq, k[:, :, :prefix])
            dots = torch.cat([dots, pre], dim=-1)
            vpre = v[:, :, :prefix, None, None].movedim(2, 4).expand(*sv.shape[:4], prefix, sv.shape[-1])
            sv = torch.cat([sv, vpre], dim=-2)
        out, lse = attend_lse(dots, sv)
        out = gather_tokens(out.flatten(3, 4), q_inv)
        return merge_rounds(out, lse.flatten(3).gather(-1, q_inv), dim=2)[:, :, :n]
