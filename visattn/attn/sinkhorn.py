"""Sparse Sinkhorn Attention — https://arxiv.org/abs/2002.11296

2D adaptation: the blocks are non-overlapping P x P windows of the map (window mean as block embedding).
A SortNet scores window pairs, Gumbel-Sinkhorn balancing turns the scores into a soft permutation, and
every window attends to its own tokens plus the (softly) sorted window's keys and values.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import AttnBlock, factory_kwargs, pad_to_multiple, resolve_heads, unpad, upcast_for_accuracy
from ..registry import register_attn

# Masked sort logits: finite, so a row or column with nothing admissible cannot produce NaN.
_MASKED = -1e9


def sinkhorn(logits: torch.Tensor, iters: int, allowed: torch.Tensor | None = None, causal: bool = False):
    """Sinkhorn balancing in log space: alternate row and column normalisation of ``exp(logits)``.

    ``logits`` (..., n, n). Non-causal: returns the (approximately) doubly stochastic matrix S^iters
    (columns sum to 1 exactly, rows to the convergence tolerance). ``causal``: columns are normalised over
    the rows up to the current one (a cumulative logsumexp, the paper's causal balancing), so row i
    depends on rows <= i only, and a final row normalisation makes each row sum to 1; ``allowed`` (n, n)
    bool restricts each row to admissible columns, and a row with none is all zero.
    """
    # Several log-space balancing passes: half types are too coarse for them, and float64 stays float64.
    z = upcast_for_accuracy(logits)
    if allowed is not None:
        z = z.masked_fill(~allowed, _MASKED)
    for _ in range(iters):
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)
        if allowed is not None:
            z = z.masked_fill(~allowed, _MASKED)
        z = z - (torch.logcumsumexp(z, dim=-2) if causal else torch.logsumexp(z, dim=-2, keepdim=True))
        if allowed is not None:
            z = z.masked_fill(~allowed, _MASKED)
    if causal:
        # Past-only column sums cannot converge to a doubly stochastic matrix (the only lower-triangular
        # one is the identity); a last row normalisation makes every sorted block a convex mixture.
        z = z - torch.logsumexp(z, dim=-1, keepdim=True)
    s = z.exp()
    return s if allowed is None else s * allowed


@register_attn(
    "sinkhorn",
    title="Sparse Sinkhorn Attention",
    arxiv="2002.11296",
    year=2020,
    family="sparse",
    complexity="O(N·P²·D + N²·D/P²)",
    flops_exponent=2.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="Gumbel-Sinkhorn soft permutation of P x P windows; a window attends to itself + its sorted window",
    reference="https://github.com/lucidrains/sinkhorn-transformer",
)
class Sinkhorn(AttnBlock):
    """Sparse Sinkhorn attention on P x P windows, ``x + proj(attn(x))`` (zero-initialised proj).

    SortNet: the window embedding (mean of its tokens) goes through the paper's two-layer ReLU MLP;
    the paper's last layer has one output per block, which ties a model to one sequence length, so here
    the MLP output is scored against every window's mean key instead (per head, scaled by 1/sqrt(d)):
    R_ij = ReLU(MLP(e_i) · k̄_j / sqrt(d)), any number of windows. Gumbel noise (training only) and
    temperature: S = Sinkhorn((R + g) / tau) with ``sinkhorn_iter`` balancing steps. Keys and values of
    the windows are sorted with S (values as values: the sorted V is S·V, not S·K), and each window
    attends, through SDPA, to its own P² keys and the P² keys of its sorted window (the paper's
    local + sorted attention). With a single window this is exactly full attention.

    ``causal=True`` (causal Sinkhorn balancing): a window may be sorted only to windows of earlier
    window-rows (all their pixels precede it in raster order), columns are balanced over the windows up
    to the current one, and the query side of the SortNet sees only pixels up to the window's first
    (top-left) pixel (a cumulative mean); the local part is causal. Windows of the first window-row have
    no sorted part.

    Args:
        channels: input channels C.
        window_size: side P of the windows (blocks of P² tokens).
        heads: attention heads (default: ``default_heads(C)``).
        temperature: Gumbel-Sinkhorn temperature tau (paper: 0.75).
        sinkhorn_iter: balancing iterations (7, the paper's best, with tau = 0.75, per sinkhorn-transformer's
            README). Truncated balancing is exact for columns; rows converge slowly for near-permutation
            scores (e.g. with Gumbel noise on many windows), as in the paper.
        qkv_bias: bias of the q/k/v projections.
        causal: raster-order causal attention.
    """

    def __init__(
        self,
        channels: int,
        *,
        window_size: int = 8,
        heads: int | None = None,
        temperature: float = 0.75,
        sinkhorn_iter: int = 7,
        qkv_bias: bool = True,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        for name, value in (("window_size", window_size), ("sinkhorn_iter", sinkhorn_iter)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sinkhorn: {name} must be an int >= 1, got {value!r}")
        heads = resolve_heads(channels, heads, "sinkhorn")
        if not temperature > 0:
            raise ValueError(f"sinkhorn: temperature must be > 0, got {temperature!r}")
        dd = factory_kwargs(device, dtype)
        self.window_size, self.heads, self.head_dim = window_size, heads, channels // heads
        self.temperature, self.sinkhorn_iter, self.causal = float(temperature), sinkhorn_iter, bool(causal)
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        self.sort_net = nn.Sequential(
            nn.Linear(channels, channels, **dd), nn.ReLU(), nn.Linear(channels, channels, **dd)
        )
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._windows(x)
        q, k, v, valid, p = w["q"], w["k"], w["v"], w["valid"], w["p"]
        s = self._sort(w)  # (b, h, nW, nW)
        sk = torch.einsum("bhij,bhjtd->bhitd", s.to(k.dtype), k)
        sv = torch.einsum("bhij,bhjtd->bhitd", s.to(v.dtype), v)  # values sorted as values
        mask = None
        if self.causal or w["padded"]:
            mask = self._mask(s, valid, p).to(q.dtype).flatten(1, 2)
        # 4D inputs keep SDPA on its fused kernels (5D falls back to the math path).
        out = F.scaled_dot_product_attention(
            q.flatten(1, 2),
            torch.cat([k, sk], -2).flatten(1, 2),
            torch.cat([v, sv], -2).flatten(1, 2),
            attn_mask=mask,
        )
        out = self.proj(rearrange(out, "b (h w) t d -> b w t (h d)", h=self.heads))
        out = rearrange(out, "b (Y X) (y x) c -> b c (Y y) (X x)", Y=w["gy"], y=p)
        return x + unpad(out, w["pads"])

    def sort_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """The block sort matrix S (B, heads, nW, nW) of a map ``x`` (Gumbel noise in training only).
        Row i mixes the windows sorted into window i; S is (approximately) doubly stochastic."""
        return self._sort(self._windows(x))

    def _windows(self, x: torch.Tensor) -> dict:
        """Pad to P multiples and cut into windows: q, k, v (b, h, nW, P², d), valid (nW, P²)."""
        height, width = x.shape[-2:]
        p = min(self.window_size, max(height, width))
        xp, pads = pad_to_multiple(x, p)
        hp, wp = xp.shape[-2:]
        ok = (torch.arange(hp, device=x.device) < height).view(-1, 1) & (
            torch.arange(wp, device=x.device) < width
        )
        valid = rearrange(ok, "(Y y) (X x) -> (Y X) (y x)", y=p, x=p)
        tokens = rearrange(xp, "b c (Y y) (X x) -> b (Y X) (y x) c", y=p, x=p)
        q, k, v = rearrange(self.qkv(tokens), "b w t (s h d) -> s b h w t d", s=3, h=self.heads)
        padded = (hp, wp) != (height, width)
        if padded:  # padding must not enter window means or sorted blocks
            keep = valid.to(k.dtype).unsqueeze(-1)
            k, v = k * keep, v * keep
        return dict(
            q=q,
            k=k,
            v=v,
            xp=xp,
            pads=pads,
            valid=valid,
            p=p,
            gy=hp // p,
            gx=wp // p,
            padded=padded,
        )

    def _sort(self, w: dict) -> torch.Tensor:
        k, valid = w["k"], w["valid"]
        k_mean = k.sum(-2) / valid.sum(-1).clamp_min(1).to(k.dtype).unsqueeze(-1)  # (b, h, nW, d)
        e = self._window_embedding(w["xp"], valid, w["gy"], w["gx"])  # (b, nW, C)
        s_q = rearrange(self.sort_net(e), "b w (h d) -> b h w d", h=self.heads)
        r = upcast_for_accuracy(
            F.relu(torch.einsum("bhid,bhjd->bhij", s_q, k_mean) / math.sqrt(self.head_dim))
        )
        if self.training:
            u = torch.rand_like(r).clamp(1e-6, 1 - 1e-6)
            r = r - torch.log(-torch.log(u))  # Gumbel noise
        allowed = None
        if self.causal:
            rows = torch.arange(w["gy"] * w["gx"], device=k.device) // w["gx"]
            allowed = rows.view(1, -1) < rows.view(-1, 1)  # only windows of earlier window-rows
        return sinkhorn(r / self.temperature, self.sinkhorn_iter, allowed, causal=self.causal)

    def _mask(self, s: torch.Tensor, valid: torch.Tensor, p: int) -> torch.Tensor:
        """Additive (b, h, nW, P², 2P²) bias: padded or (causal) later local keys, and log of the share of
        a sorted slot's mixture that comes from real tokens (-inf for a window with nothing sorted in)."""
        t = p * p
        local = valid.unsqueeze(-2).expand(-1, t, -1)
        if self.causal:
            # Inside a window, raster order is row-major window order: lower-triangular.
            local = local & torch.ones(t, t, dtype=torch.bool, device=s.device).tril()
        local = torch.zeros(local.shape, device=s.device, dtype=s.dtype).masked_fill(~local, float("-inf"))
        share = torch.einsum("bhij,jt->bhit", s, valid.to(s.dtype)) / s.sum(-1, keepdim=True).clamp_min(1e-30)
        sorted_bias = torch.where(share > 0, share.clamp_min(1e-30).log(), float("-inf"))
        b, h, nw = s.shape[:3]
        return torch.cat(
            [local.expand(b, h, -1, -1, -1), sorted_bias.unsqueeze(-2).expand(-1, -1, -1, t, -1)], -1
        )

    def _window_embedding(self, xp, valid, gy: int, gx: int) -> torch.Tensor:
        """(b, nW, C): the window mean, or causally the mean of all pixels up to its top-left pixel
        (padding is zero, so sums skip it; the counts exclude it)."""
        p = xp.shape[-1] // gx
        if not self.causal:
            tokens = rearrange(xp, "b c (Y y) (X x) -> b (Y X) (y x) c", y=p, x=p)
            return tokens.sum(-2) / valid.sum(-1).clamp_min(1).to(xp.dtype).view(-1, 1)
        counts = rearrange(valid, "(Y X) (y x) -> (Y y X x)", Y=gy, y=p, x=p).to(xp.dtype).cumsum(0)
        sums = xp.flatten(2).cumsum(-1)  # raster order of the padded map
        first = (
            torch.arange(gy, device=xp.device).view(-1, 1) * p * gx * p
            + torch.arange(gx, device=xp.device) * p
        )
        first = first.flatten()
        return (sums[..., first] / counts[first].clamp_min(1)).transpose(1, 2)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, window_size={self.window_size}, heads={self.heads}, "
            f"temperature={self.temperature}, sinkhorn_iter={self.sinkhorn_iter}, causal={self.causal}"
        )
