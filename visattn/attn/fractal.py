"""Looking for change? Roll the Dice and demand Attention (FracTAL) — https://arxiv.org/abs/2009.02062

Native 2D: sigmoid queries, keys and values from 3x3 conv + BN; the fractal Tanimoto similarity of
Q and K is taken per pixel over channels (spatial) and per channel over pixels (channel), both
O(N·C), and the mean of the two re-weights V; the block gates its input with (1 + γ·attention).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..layers import AttnBlock, accuracy_dtype, check_odd_kernel, factory_kwargs
from ..registry import register_attn

__all__ = ["FracTAL", "fractal_tanimoto", "fractal_tanimoto_with_complement"]


def fractal_tanimoto(pl: torch.Tensor, pp: torch.Tensor, ll: torch.Tensor, depth: int, smooth: float = 1e-5):
    """Fractal Tanimoto similarity of depth d from the inner products p·l, p·p and l·l:

    T^d(p, l) = 1/d · Σ_{i<d} (p·l + s) / (2^i (p·p + l·l) − (2^{i+1} − 1) p·l + s)

    (d = 0 is the plain Tanimoto coefficient, as d = 1.) For p, l >= 0 every term lies in [0, 1]:
    by Cauchy-Schwarz the denominator is at least p·l. It is clamped there so rounding cannot push
    a term above 1.
    """
    d = max(1, depth)
    a = torch.pow(2.0, torch.arange(d, device=pl.device, dtype=pl.dtype)).view(-1, *([1] * pl.dim()))
    denom = torch.maximum(a * (pp + ll) - (2 * a - 1) * pl, pl)
    return ((pl + smooth) / (denom + smooth)).mean(0)


def _inner_products(p: torch.Tensor, l: torch.Tensor, dims) -> tuple[torch.Tensor, ...]:
    return (p * l).sum(dims, keepdim=True), (p * p).sum(dims, keepdim=True), (l * l).sum(dims, keepdim=True)


def fractal_tanimoto_with_complement(
    p: torch.Tensor, l: torch.Tensor, dims, depth: int, smooth: float = 1e-5
):
    """The paper's similarity with complement, ½(T^d(p, l) + T^d(1 − p, 1 − l)), contracting ``dims``.

    The complement products are computed directly, not from p·l and the sums of p and l, whose
    difference cancels catastrophically when p, l saturate at 1.
    """
    same = fractal_tanimoto(*_inner_products(p, l, dims), depth, smooth)
    comp = fractal_tanimoto(*_inner_products(1.0 - p, 1.0 - l, dims), depth, smooth)
    return 0.5 * (same + comp)


@register_attn(
    "fractal",
    title="Looking for change? Roll the Dice and demand Attention",
    arxiv="2009.02062",
    year=2021,
    family="structured2d",
    complexity="O(H·W·D)",
    flops_exponent=1.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="fractal Tanimoto similarity of sigmoid Q and K over channels (per pixel) and over pixels "
    "(per channel) re-weights V",
    reference="https://github.com/feevos/ceecnet",
)
class FracTAL(AttnBlock):
    """FracTAL: ``x ⊙ (1 + γ · BN(½ (T_chan(Q, K) + T_spat(Q, K)) ⊙ V))`` with γ = 0 at init.

    Q, K, V = sigmoid(BN(conv3x3(x))) with convolutions grouped by ``heads`` (the official code's
    multi-head form). T is the fractal Tanimoto similarity with complement; T_spat contracts over
    channels (one value per pixel), T_chan over pixels (one value per channel), so both lie in
    [0, 1] and no N x N matrix exists. The multiplicative (1 + γ·A) fusion with a zero-initialised
    scalar γ is how the official FracTAL ResNet unit uses the layer; it makes the block the
    identity at initialisation.

    Args:
        channels: input channels C.
        depth: fractal depth d of the Tanimoto similarity (paper and official code: 5).
        heads: groups of the Q/K/V convolutions; must divide C (official default: 1).
        kernel_size: odd kernel of the Q/K/V convolutions (official: 3).
        smooth: the similarity's smoothing constant (official: 1e-5).
    """

    def __init__(
        self,
        channels: int,
        *,
        depth: int = 5,
        heads: int = 1,
        kernel_size: int = 3,
        smooth: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"fractal: depth must be an int >= 0, got {depth!r}")
        if heads < 1 or channels % heads:
            raise ValueError(f"fractal: heads ({heads}) must be >= 1 and divide channels ({channels})")
        check_odd_kernel(kernel_size, "fractal")
        if not smooth > 0:
            raise ValueError(f"fractal: smooth must be > 0, got {smooth}")
        dd = factory_kwargs(device, dtype)
        self.depth, self.heads, self.smooth = depth, heads, smooth
        # One grouped conv makes Q, K and V: group g emits [q_g, k_g, v_g], the same weights as three
        # separate grouped convs; one BN over its 3C channels is three per-channel BNs.
        self.qkv = nn.Conv2d(
            channels, 3 * channels, kernel_size, padding=kernel_size // 2, groups=heads, bias=False, **dd
        )
        self.qkv_norm = nn.BatchNorm2d(3 * channels, **dd)
        self.norm = nn.BatchNorm2d(channels, **dd)
        self.gamma = nn.Parameter(torch.zeros(1, **dd))

    def qkv_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sigmoid Q, K, V, each (B, C, H, W) in [0, 1]."""
        qkv = self.qkv_norm(self.qkv(x)).sigmoid()
        q, k, v = rearrange(qkv, "b (g t c) h w -> t b (g c) h w", g=self.heads, t=3)
        return q, k, v

    def similarities(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(spatial (B, 1, H, W), channel (B, C, 1, 1)) fractal Tanimoto similarities, in [0, 1].

        Computed in at least float32 so that bf16 rounding of the inner products cannot break the bounds.
        """
        dt = accuracy_dtype(q.dtype)
        q, k = q.to(dt), k.to(dt)
        spatial = fractal_tanimoto_with_complement(q, k, (1,), self.depth, self.smooth)
        channel = fractal_tanimoto_with_complement(q, k, (2, 3), self.depth, self.smooth)
        return spatial, channel

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_maps(x)
        spatial, channel = self.similarities(q, k)
        attention = self.norm(v * (0.5 * (spatial + channel)).to(v.dtype))
        return x * (1.0 + self.gamma * attention)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, depth={self.depth}, heads={self.heads}"
