"""Efficient Attention: Attention with Linear Complexities — https://arxiv.org/abs/1812.01243

Native 2D: E = ρ_q(Q) · (ρ_k(K)ᵀ V) on 1x1-conv projections of the map, ρ_q a softmax over the
key channels of each pixel and ρ_k a softmax over the pixels of each key channel, so the global
context ρ_k(K)ᵀV is a d_k x d_v matrix and nothing N x N is ever formed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from ..layers import AttnBlock, factory_kwargs
from ..registry import register_attn

_NORMALIZATIONS = ("softmax", "scaling")


@register_attn(
    "efficient_attention",
    title="Efficient Attention: Attention with Linear Complexities",
    arxiv="1812.01243",
    year=2021,
    family="linear",
    complexity="O(N·d_k·d_v)",
    flops_exponent=1.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="softmax over key channels per pixel and over pixels per key channel, then Q(KᵀV) in linear time",
    reference="https://github.com/cmsflash/efficient-attention",
)
class EfficientAttention(AttnBlock):
    """Efficient attention module: ``x + W_r · ρ_q(Q)(ρ_k(K)ᵀV)`` with a zero-initialised W_r.

    The official module returns ``reprojection + input`` itself; here that is the only residual
    (no second one around it). The reprojection W_r is zero-initialised so the block is the
    identity at initialisation. Heads are channel groups (the official repository's extension; the
    paper uses one head). With ``normalization="scaling"`` ρ_q = ρ_k = Y/√N and the result equals
    dot-product attention (QKᵀ/N)V exactly, the paper's equivalence result.

    Args:
        channels: input channels C.
        key_channels: total key/query channels d_k (default C // 2, the inter-channels of the non-local
            block it is a drop-in for; the paper varies it).
        value_channels: total value channels d_v (default C // 2).
        heads: channel groups; must divide d_k and d_v (paper: 1).
        normalization: ``"softmax"`` (the paper's main variant) or ``"scaling"``.
    """

    def __init__(
        self,
        channels: int,
        *,
        key_channels: int | None = None,
        value_channels: int | None = None,
        heads: int = 1,
        normalization: str = "softmax",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        dk = max(1, channels // 2) if key_channels is None else key_channels
        dv = max(1, channels // 2) if value_channels is None else value_channels
        if dk < 1 or dv < 1:
            raise ValueError(f"efficient_attention: key/value channels must be >= 1, got {dk}, {dv}")
        if heads < 1 or dk % heads or dv % heads:
            raise ValueError(
                f"efficient_attention: heads ({heads}) must be >= 1 and divide key_channels ({dk}) "
                f"and value_channels ({dv})"
            )
        if normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"efficient_attention: normalization must be one of {_NORMALIZATIONS}, got {normalization!r}"
            )
        dd = factory_kwargs(device, dtype)
        self.key_channels, self.value_channels, self.heads = dk, dv, heads
        self.normalization = normalization
        # Separate convs (the official module's names): a fused QKV conv would need its output split
        # and its gradient re-assembled, and a saved V slice would keep the whole QKV storage alive.
        self.queries = nn.Conv2d(channels, dk, 1, **dd)
        self.keys = nn.Conv2d(channels, dk, 1, **dd)
        self.values = nn.Conv2d(channels, dv, 1, **dd)
        self.reprojection = nn.Conv2d(dv, channels, 1, **dd)
        nn.init.zeros_(self.reprojection.weight)
        nn.init.zeros_(self.reprojection.bias)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        n = h * w
        q = rearrange(self.queries(x), "b (g d) h w -> b g d (h w)", g=self.heads)
        k = rearrange(self.keys(x), "b (g d) h w -> b g d (h w)", g=self.heads)
        v = rearrange(self.values(x), "b (g d) h w -> b g d (h w)", g=self.heads)
        if self.normalization == "softmax":
            q = q.softmax(dim=-2)  # over the key channels of each pixel
            k = k.softmax(dim=-1)  # over the pixels of each key channel
        else:
            q = q * n**-0.5
            k = k * n**-0.5
        context = torch.matmul(k, v.transpose(-1, -2))  # (B, g, d_k/g, d_v/g): the global context
        # W_r · (contextᵀ ρ_q(Q)) = (W_r · contextᵀ) ρ_q(Q): folding the 1x1 reprojection into the
        # tiny context first skips the (d_v, N) attended values, their N·d_k·d_v/g FLOPs and the
        # activation the reprojection would save for backward; the same sum, reassociated.
        w = self.reprojection.weight.view(self.channels, self.heads, -1).transpose(0, 1)  # (g, C, d_v/g)
        mixed = torch.matmul(w, context.transpose(-1, -2))  # (B, g, C, d_k/g)
        mixed = rearrange(mixed, "b g c d -> b c (g d)")
        out = torch.matmul(mixed, rearrange(q, "b g d n -> b (g d) n"))  # (B, C, N)
        out = out + self.reprojection.bias.view(1, -1, 1)
        return x + out.view_as(x)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, key_channels={self.key_channels}, "
            f"value_channels={self.value_channels}, heads={self.heads}, normalization={self.normalization!r}"
        )
