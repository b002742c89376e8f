"""Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention — https://arxiv.org/abs/2102.03902

Sequence method on the flattened map (raster order). The landmarks are means of Q and K over the cells of a
2-D landmark grid (adaptive average pooling; 1-D segments of the raster sequence would straddle image rows),
and the paper's 1-D depthwise-conv skip on V becomes a 2-D depthwise conv with one kernel per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

from ..layers import (
    AttnBlock,
    ConvPosEnc,
    accuracy_dtype,
    factory_kwargs,
    resolve_heads,
    to_map,
    to_tokens,
    upcast_for_accuracy,
)
from ..registry import register_attn


def newton_schulz_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Moore–Penrose pseudo-inverse of each (m, m) matrix in ``a`` (..., m, m) by the paper's iteration.

    Z₀ = Aᵀ / (‖A‖₁ ‖A‖_∞) with the norms of each matrix on its own — the reference implementation takes the
    maximum over the whole batch and all heads, which makes one sample's output depend on the others — then
    Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ))). Runs in at least float32 (float64 stays float64), even under
    autocast.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        a = upcast_for_accuracy(a)
        eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        norm_1 = a.abs().sum(-2).amax(-1)  # max column sum
        norm_inf = a.abs().sum(-1).amax(-1)  # max row sum
        z = a.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
        for _ in range(iterations):
            az = a @ z
            z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def cell_means(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Means of ``x`` (..., H, W) over the cells of a fixed (gh, gw) grid: (..., gh, gw).

    Along an axis of n >= g pixels the cells are ``adaptive_avg_pool2d``'s bins [⌊i·n/g⌋, ⌈(i+1)·n/g⌉); along
    a shorter axis cell i is the single pixel ⌊i·n/g⌋, so every pixel is a landmark (repeated), which keeps
    the Nyström product exactly softmax attention on small maps. Written as two averaging matrices from
    tensor arithmetic, so the landmark count is fixed and exported graphs (torch.export, ONNX) keep the exact
    bins for any dynamic H, W.
    """

    def bins(n: int, g: int) -> torch.Tensor:
        j = torch.arange(n, device=x.device)
        count = torch.ones_like(j).sum()  # n as a tensor: no shape arithmetic, no export guards
        i = torch.arange(g, device=x.device)[:, None]
        start = i * count // g
        end = torch.where(count >= g, ((i + 1) * count + g - 1) // g, start + 1)
        inside = ((j >= start) & (j < end)).to(x.dtype)
        return inside / inside.sum(1, keepdim=True)

    return bins(x.shape[-2], grid[0]) @ x @ bins(x.shape[-1], grid[1]).T


@register_attn(
    "nystrom",
    title="Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention",
    arxiv="2102.03902",
    year=2021,
    family="lowrank",
    complexity="O(N·m·D + m³)",
    flops_exponent=1.0,
    native_2d=False,
    causal=False,
    identity_init=True,
    idea="Nyström approximation of softmax attention through m landmark queries and keys (2-D pooled)",
    reference="https://github.com/mlpen/Nystromformer",
)
class Nystrom(AttnBlock):
    """``x + W_o [softmax(Q K̃ᵀ/√d) · pinv(softmax(Q̃ K̃ᵀ/√d)) · softmax(Q̃ Kᵀ/√d) V + conv(V)]``, per head.

    Q̃, K̃ are Q, K averaged over the cells of an (lh, lw) landmark grid (``landmarks`` = lh·lw = m, paper 64;
    :func:`cell_means`). Along an axis shorter than the grid every pixel becomes a landmark (some repeated):
    a Nyström product whose landmarks are all the pixels, with any multiplicities, is exactly softmax
    attention (up to the pseudo-inverse's convergence), and m stays fixed for export. The two outer softmax products go through
    ``scaled_dot_product_attention``; the m x m pseudo-inverse uses ``pinv_iterations`` steps of
    :func:`newton_schulz_pinv`, initialised per sample. Nothing here is N x N.

    Args:
        channels: input channels C.
        landmarks: m, a perfect square (grid √m x √m) or an (lh, lw) grid (paper: 64).
        heads: attention heads (default: ``default_heads(C)``, heads of about 32 channels).
        pinv_iterations: iterations of the pseudo-inverse (paper: 6).
        conv_kernel: k of the k x k depthwise skip conv on V, one kernel per head (the paper's 33-tap 1-D
            conv; default 5, the odd square nearest 33 taps); 0 disables it.
        pos_enc: add a conditional 2-D positional encoding (CPVT's PEG) to the input of Q and K, V, since the
            attention itself only sees content.
    """

    def __init__(
        self,
        channels: int,
        *,
        landmarks: int | tuple[int, int] = 64,
        heads: int | None = None,
        pinv_iterations: int = 6,
        conv_kernel: int = 5,
        pos_enc: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if isinstance(landmarks, int) and not isinstance(landmarks, bool):
            side = math.isqrt(max(landmarks, 0))
            if landmarks < 1 or side * side != landmarks:
                raise ValueError(
                    f"nystrom: landmarks must be a perfect square or an (lh, lw) grid, got {landmarks!r}"
                )
            grid = (side, side)
        else:
            grid = tuple(landmarks) if isinstance(landmarks, (tuple, list)) else ()
            if len(grid) != 2 or not all(
                isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid
            ):
                raise ValueError(
                    f"nystrom: landmarks must be a perfect square or an (lh, lw) grid, got {landmarks!r}"
                )
        heads = resolve_heads(channels, heads, "nystrom")
        if isinstance(pinv_iterations, bool) or not isinstance(pinv_iterations, int) or pinv_iterations < 1:
            raise ValueError(f"nystrom: pinv_iterations must be a positive int, got {pinv_iterations!r}")
        if (
            isinstance(conv_kernel, bool)
            or not isinstance(conv_kernel, int)
            or conv_kernel < 0
            or (conv_kernel and conv_kernel % 2 == 0)
        ):
            raise ValueError(f"nystrom: conv_kernel must be 0 or an odd positive int, got {conv_kernel!r}")
        dd = factory_kwargs(device, dtype)
        self.grid, self.heads, self.pinv_iterations = grid, heads, pinv_iterations
        self.pos = ConvPosEnc(channels, 3, **dd) if pos_enc else None
        self.q = nn.Linear(channels, channels, **dd)
        self.kv = nn.Linear(channels, 2 * channels, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        if conv_kernel:
            bound = 1.0 / conv_kernel  # Conv2d's default bound, 1/sqrt(fan_in) with fan_in = k²
            self.conv_weight = nn.Parameter(
                torch.empty(heads, 1, conv_kernel, conv_kernel, **dd).uniform_(-bound, bound)
            )
        else:
            self.conv_weight = None

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, landmarks={self.grid}, heads={self.heads}, "
            f"pinv_iterations={self.pinv_iterations}"
        )

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hd = self.heads
        feat = x if self.pos is None else self.pos(x)
        tokens = to_tokens(feat)
        q = self.q(tokens)
        k, v = self.kv(tokens).chunk(2, dim=-1)
        # Landmarks are cell means of Q and K; the mean commutes with the affine projections, so pool the
        # C-channel input once and project the m pooled tokens (exactly the same landmarks, far cheaper).
        pooled = to_tokens(cell_means(feat, self.grid))
        q_land, k_land = self.q(pooled), self.kv(pooled)[..., :c]
        v_tokens = v
        q, k, v, q_land, k_land = (
            rearrange(t, "b n (h d) -> b h n d", h=hd) for t in (q, k, v, q_land, k_land)
        )

        scale = q.shape[-1] ** -0.5
        kernel_3_v = F.scaled_dot_product_attention(q_land, k, v)  # softmax(Q̃ Kᵀ/√d) V: (B, h, m, d)
        acc = accuracy_dtype(q.dtype)
        kernel_2 = (q_land @ k_land.transpose(-1, -2) * scale).to(acc).softmax(dim=-1)  # (B, h, m, m)
        middle = (newton_schulz_pinv(kernel_2, self.pinv_iterations) @ kernel_3_v.to(acc)).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k_land, middle)  # softmax(Q K̃ᵀ/√d) · middle
        out = rearrange(out, "b h n d -> b n (h d)")
        if self.conv_weight is not None:
            weight = repeat(self.conv_weight, "h 1 i j -> (h d) 1 i j", d=c // hd)
            pad = weight.shape[-1] // 2
            # Channels-last keeps the CPU depthwise-conv backward on its fast path (NCHW 5x5: ~10x slower).
            v_map = to_map(v_tokens, h, w).contiguous(memory_format=torch.channels_last)
            skip = F.conv2d(v_map, weight.to(v.dtype), padding=pad, groups=c)
            out = out + to_tokens(skip)
        return x + to_map(self.proj(out), h, w)
