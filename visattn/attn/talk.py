"""Time-aware Large Kernel Convolutions (TaLK) — https://arxiv.org/abs/2002.03184

2D adaptation: each pixel and head predicts four extents (up, down, left, right) = sigmoid(1x1 conv)
times the maximum extents, and averages the value map over that box in O(1) per pixel with four
bilinearly-interpolated lookups into a 2D summed-area table (the paper's 1D prefix sum with linear
interpolation at fractional ends, applied per axis). ``causal=True`` keeps only the up and left extents.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import AttnBlock, default_heads, factory_kwargs, upcast_for_accuracy
from ..registry import register_attn

__all__ = ["TaLK", "summed_area_table", "box_sum"]


def summed_area_table(v: torch.Tensor) -> torch.Tensor:
    """Channels-last (G, H, W, c) -> (G, H + 1, W + 1, c) with ``S[:, u, v] = v[:, :u, :v].sum((1, 2))``
    (a zero first row and column)."""
    return F.pad(v.cumsum(1).cumsum(2), (0, 0, 1, 0, 1, 0))


def _lookups(coord: torch.Tensor, sign: float) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Linear interpolation of a prefix table at continuous ``coord`` in [0, size]: two
    (index, weight, d weight / d coord) triples. An integer coordinate c reads entries (c - 1, c) with
    weights (0, 1), never c + 1, so a lookup never touches rows or columns past ceil(coord); that
    keeps the causal variant exact."""
    lo = (coord.ceil() - 1).clamp(min=0)
    frac = coord - lo
    return [(lo.long(), sign * (1 - frac), -sign), ((lo + 1).long(), sign * frac, sign)]


def _reads(sat, y0, y1, x0, x1):
    """The 16 table reads of every pixel: (table rows, row index, row item, column item), where an item
    is (which edge: 0 far / 1 near, index, weight, d weight / d edge)."""
    g, hp, wp, c = sat.shape
    table = sat.reshape(g * hp * wp, c)
    base = torch.arange(g, device=sat.device).view(g, 1) * (hp * wp)
    rows = [(0, *t) for t in _lookups(y1.flatten(1), 1.0)] + [(1, *t) for t in _lookups(y0.flatten(1), -1.0)]
    cols = [(0, *t) for t in _lookups(x1.flatten(1), 1.0)] + [(1, *t) for t in _lookups(x0.flatten(1), -1.0)]
    for r in rows:
        for q in cols:
            yield table, (base + r[1] * wp + q[1]).flatten(), r, q


class _BoxSum(torch.autograd.Function):
    """Hand-written backward: autograd would save all 16 gathered (G, N, c) reads for the weights'
    gradients; this saves only the table and the edges."""

    @staticmethod
    def forward(ctx, sat, y0, y1, x0, x1):
        ctx.save_for_backward(sat, y0, y1, x0, x1)
        out = sat.new_zeros(y0.numel(), sat.shape[-1])
        for table, idx, r, q in _reads(sat, y0, y1, x0, x1):
            out.addcmul_(table.index_select(0, idx), (r[2] * q[2]).reshape(-1, 1))
        return out.view(*y0.shape, -1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        sat, y0, y1, x0, x1 = ctx.saved_tensors
        grad = grad.reshape(y0.numel(), -1).contiguous()
        c = sat.shape[-1]
        grad_table = torch.zeros_like(sat).view(-1) if ctx.needs_input_grad[0] else None
        channel = torch.arange(c, device=sat.device)
        # Gradients of the (far, near) row edges and column edges, flattened to (G, N).
        grad_y = [y0.new_zeros(y0.shape[0], y0[0].numel()) for _ in range(2)]
        grad_x = [x0.new_zeros(x0.shape[0], x0[0].numel()) for _ in range(2)]
        for table, idx, r, q in _reads(sat, y0, y1, x0, x1):
            if grad_table is not None:
                # Element-wise indices into the flat table: CPU index_add_ over rows runs one slice
                # add per row, an order of magnitude slower than this 1D accumulation.
                flat_idx = (idx.unsqueeze(1) * c + channel).view(-1)
                grad_table.index_add_(0, flat_idx, (grad * (r[2] * q[2]).reshape(-1, 1)).reshape(-1))
            read = (grad * table.index_select(0, idx)).sum(-1).view_as(grad_y[0])
            grad_y[r[0]] += read * (r[3] * q[2])
            grad_x[q[0]] += read * (r[2] * q[3])
        shape = y0.shape
        return (
            None if grad_table is None else grad_table.view_as(sat),
            grad_y[1].view(shape),
            grad_y[0].view(shape),
            grad_x[1].view(shape),
            grad_x[0].view(shape),
        )


def box_sum(
    sat: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor
) -> torch.Tensor:
    """Sum of a piecewise-constant map over the continuous boxes [y0, y1) x [x0, x1).

    Pixel (k, m) covers the unit square [k, k + 1) x [m, m + 1), so a fractional edge takes the
    covered fraction of its border pixels (the paper's linear interpolation of prefix sums).

    Args:
        sat: (G, H + 1, W + 1, c) channels-last table from :func:`summed_area_table`.
        y0, y1: (G, H, W) row edges with 0 <= y0 <= y1 <= H (one box per output pixel).
        x0, x1: (G, H, W) column edges with 0 <= x0 <= x1 <= W.

    Returns:
        (G, H, W, c) box sums: four corner lookups, each bilinear (16 row reads per pixel, any box size).
    """
    return _BoxSum.apply(sat, y0, y1, x0, x1)


@register_attn(
    "talk",
    title="Time-aware Large Kernel Convolutions",
    arxiv="2002.03184",
    year=2020,
    family="conv",
    complexity="O(N·D)",
    flops_exponent=1.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="per-pixel learned box extents; box average from a summed-area table in O(1) per pixel",
    reference="https://github.com/lioutasb/TaLKConvolutions",
)
class TaLK(AttnBlock):
    """TaLK convolution sublayer on a feature map: ``x + proj(talk(glu(in_proj(x))))``.

    Channels are split into heads that share one box per pixel. A box spans
    ``[i - a_up * max_up, i + a_down * max_down] x [j - a_left * max_left, j + a_right * max_right]``
    (a = sigmoid of a 1x1 conv of the projected input, edges clamped to the map), with fractional
    edges taken by linear interpolation of the summed-area table. The output projection is zero-initialised,
    so the block is the identity at initialisation.

    Args:
        channels: input channels C.
        max_extent: maximum box extent in pixels, one int for all four directions or
            (up, down, left, right). The paper grows it with depth (1, 3, 7, 15, 15, ...); 15 is the
            value of most of its layers.
        heads: heads sharing one box (default: one per 64 channels, as the paper's 512-d/8-head model).
        glu: GLU after the input projection (paper default: on).
        offset_dropout: dropout on the predicted extents (paper: 0 in the base model).
        normalize: ``"area"`` divides the box sum by the box's own area (a true box mean);
            ``"max"`` divides by the largest possible area, as the paper's 1D operator does.
        causal: raster-causal variant: the box is [i - a_up * max_up, i] x [j - a_left * max_left, j]
            (rows above and the current row, columns up to the current one), all at or before (i, j).
    """

    def __init__(
        self,
        channels: int,
        *,
        max_extent: int | tuple[int, int, int, int] = 15,
        heads: int | None = None,
        glu: bool = True,
        offset_dropout: float = 0.0,
        normalize: str = "area",
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        extents = (max_extent,) * 4 if isinstance(max_extent, int) else tuple(max_extent)
        if len(extents) != 4 or any(not isinstance(e, int) or e < 0 for e in extents):
            raise ValueError(f"talk: max_extent must be an int >= 0 or 4 such ints, got {max_extent!r}")
        heads = default_heads(channels, 64) if heads is None else heads
        if heads < 1 or channels % heads:
            raise ValueError(f"talk: heads must divide channels ({channels}), got {heads}")
        if not 0.0 <= offset_dropout < 1.0:
            raise ValueError(f"talk: offset_dropout must be in [0, 1), got {offset_dropout}")
        if normalize not in ("area", "max"):
            raise ValueError(f"talk: normalize must be 'area' or 'max', got {normalize!r}")
        dd = factory_kwargs(device, dtype)
        self.max_extent = extents
        self.heads = heads
        self.glu = glu
        self.normalize = normalize
        self.causal = causal
        self.in_proj = nn.Conv2d(channels, channels * (2 if glu else 1), 1, **dd)
        # Causal boxes end at the pixel itself: only the up and left extents are predicted.
        self.offsets = nn.Conv2d(channels, heads * (2 if causal else 4), 1, **dd)
        self.offset_drop = nn.Dropout(offset_dropout)
        self.proj = nn.Conv2d(channels, channels, 1, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, heads={self.heads}, max_extent={self.max_extent}, "
            f"normalize={self.normalize!r}, causal={self.causal}"
        )

    def box_edges(self, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Continuous box edges (y0, y1, x0, x1), each (B * heads, H, W), for the projected map ``v``."""
        h, w = v.shape[-2:]
        up, down, left, right = self.max_extent
        # At least float32 (half-precision edges are too coarse), never below the input's precision.
        a = upcast_for_accuracy(self.offset_drop(torch.sigmoid(self.offsets(v))))
        a = rearrange(a, "b (k n) h w -> k (b n) h w", n=self.heads)
        i = torch.arange(h, device=v.device, dtype=a.dtype).view(h, 1)
        j = torch.arange(w, device=v.device, dtype=a.dtype).view(1, w)
        y0 = (i - a[0] * up).clamp(min=0)
        x0 = (j - a[1 if self.causal else 2] * left).clamp(min=0)
        if self.causal:
            # Exact integer far edges: the lookups then read nothing past (i, j) in raster order.
            y1 = (i + 1).expand_as(y0)
            x1 = (j + 1).expand_as(x0)
        else:
            y1 = (i + a[1] * down).clamp(max=h - 1) + 1
            x1 = (j + a[3] * right).clamp(max=w - 1) + 1
        return y0, y1, x0, x1

    def talk(self, v: torch.Tensor) -> torch.Tensor:
        """The TaLK operator on the projected map ``v`` (B, C, H, W): box mean (or sum / max area)."""
        y0, y1, x0, x1 = self.box_edges(v)
        vf = rearrange(v.to(y0.dtype), "b (n c) h w -> (b n) h w c", n=self.heads)
        # box_sum(v - s) + s * area == box_sum(v) for any s: a per-channel shift near the values makes
        # the table hold centred sums, which cancel far less in float32. Detached, so gradients stay
        # exactly those of the box; the causal shift is the first pixel, which every pixel may see.
        shift = (vf[:, :1, :1] if self.causal else vf.mean((1, 2), keepdim=True)).detach()
        area = ((y1 - y0) * (x1 - x0)).unsqueeze(-1)
        total = box_sum(summed_area_table(vf - shift), y0, y1, x0, x1) + shift * area
        if self.normalize == "area":
            out = total / area
        else:
            up, down, left, right = self.max_extent
            out = total / ((up + 1) * (left + 1) if self.causal else (up + down + 1) * (left + right + 1))
        return rearrange(out, "(b n) h w c -> b (n c) h w", n=self.heads).to(v.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.in_proj(x)
        if self.glu:
            v = F.glu(v, dim=1)
        return x + self.proj(self.talk(v))
