"""Interlaced Sparse Self-Attention for Semantic Segmentation — https://arxiv.org/abs/1907.12273

Native 2D: with local group size (P_h, P_w), a long-range step lets the pixels that share an offset
inside every P_h x P_w block attend to each other (a map down-sampled by the group size), then a
short-range step lets the pixels of each block attend to each other; after both, every pixel sees every
pixel. Maps that are not multiples of the group size are padded symmetrically (as mmsegmentation) and cropped.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import ConvNormAct, make_divisible

from ..layers import AttnBlock, ceil_div, factory_kwargs, multihead_sdpa, unpad
from ..layers.compat import is_exporting
from ..registry import register_attn

__all__ = ["ISA", "ISASelfAttention"]


class ISASelfAttention(nn.Module):
    """The dense self-attention of one ISA step, applied to each group of a (G, C, h, w) batch of groups.

    Layout of mmsegmentation's ISA ``SelfAttentionBlock``: query/key projections of two 1x1 conv + BN +
    ReLU each, a 1x1 conv value projection with bias, softmax(q kᵀ / sqrt(d)) v, and a 1x1 conv + BN +
    ReLU output projection.

    Args:
        channels: channels C of the map (and of values and outputs).
        qk_channels: channels d of queries and keys.
    """

    def __init__(self, channels: int, qk_channels: int, *, device=None, dtype=None) -> None:
        super().__init__()
        dd = factory_kwargs(device, dtype)

        def qk_project() -> nn.Sequential:
            return nn.Sequential(
                ConvNormAct(channels, qk_channels, 1, **dd), ConvNormAct(qk_channels, qk_channels, 1, **dd)
            )

        self.key_project = qk_project()
        self.query_project = qk_project()
        self.value_project = nn.Conv2d(channels, channels, 1, **dd)
        self.output_project = ConvNormAct(channels, channels, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[-2]
        q, k, v = (
            rearrange(proj(x), "g c h w -> g (h w) c")
            for proj in (self.query_project, self.key_project, self.value_project)
        )
        context = multihead_sdpa(q, k, v, 1)  # one head, scale 1/sqrt(d) as mmseg's matmul_norm
        return self.output_project(rearrange(context, "g (h w) c -> g c h w", h=h))


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"isa: {name} must be a positive int or a pair of positive ints, got {value!r}")
    return pair


def _group_count(size: int, group: int) -> int:
    """ceil(size / group). While exporting, an unbacked int (read from a tensor): torch.export would
    otherwise specialise the derived count to the example's (it is > 1 there, and contiguity and
    broadcast checks guard on "!= 1"), and the graph would not serve maps of one group."""
    if not is_exporting():
        return ceil_div(size, group)
    count = ((torch.full((), size) + group - 1) // group).item()
    torch._check(count >= 1)
    torch._check(count * group >= size)
    return count


@register_attn(
    "isa",
    title="Interlaced Sparse Self-Attention for Semantic Segmentation",
    arxiv="1907.12273",
    year=2019,
    family="sparse",
    complexity="O(N·D² + N²·D/(P_h·P_w) + N·P_h·P_w·D); O(N^1.5·D) when P_h·P_w = sqrt(N)",
    flops_exponent=2.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="dense attention within interlaced (stride-P) groups, then within P_h x P_w blocks",
    reference="https://github.com/open-mmlab/mmsegmentation",
)
class ISA(AttnBlock):
    """Long-range then short-range self-attention, added to the input through a zero-initialised 1x1 conv.

    ``x + out_proj(relation(x))``: ``relation`` is the body of mmsegmentation's ``ISAHead`` (pad,
    ``global_relation`` on interlaced groups, ``local_relation`` on blocks, crop), whose keys load here
    by name; the head fuses it with its input by ``out_conv(cat[relation(x), x])``, of which
    ``x + out_proj(·)`` is the residual form. ``out_proj`` starts at zero, so the block is the identity
    at initialisation while both relations keep their usual initialisation.

    The FLOPs are quadratic in N at a fixed group size (the long-range step attends among N/(P_h·P_w)
    pixels); N^1.5 needs P_h·P_w to grow as sqrt(N).

    Args:
        channels: input channels C.
        down_factor: local group size (P_h, P_w), an int for both (mmseg default: (8, 8)); the
            long-range step attends on the map down-sampled by this factor.
        qk_channels: query/key channels (mmseg's ``isa_channels``); default C/2 rounded to a multiple
            of 8 (mmseg: 256 for C = 512).
    """

    def __init__(
        self,
        channels: int,
        *,
        down_factor: int | tuple[int, int] = (8, 8),
        qk_channels: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        self.down_factor = _pair(down_factor, "down_factor")
        if qk_channels is None:
            qk_channels = make_divisible(channels / 2, 8)
        if isinstance(qk_channels, bool) or not isinstance(qk_channels, int) or qk_channels < 1:
            raise ValueError(f"isa: qk_channels must be a positive int, got {qk_channels!r}")
        dd = factory_kwargs(device, dtype)
        self.global_relation = ISASelfAttention(channels, qk_channels, **dd)
        self.local_relation = ISASelfAttention(channels, qk_channels, **dd)
        self.out_proj = nn.Conv2d(channels, channels, 1, **dd)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def long_range(self, x: torch.Tensor) -> torch.Tensor:
        """Attention among the pixels at the same offset in every block (H, W multiples of the group size)."""
        ph, pw = self.down_factor
        t = rearrange(x, "b c (gh ph) (gw pw) -> (b ph pw) c gh gw", ph=ph, pw=pw)
        t = self.global_relation(t)
        return rearrange(t, "(b ph pw) c gh gw -> b c (gh ph) (gw pw)", ph=ph, pw=pw)

    def short_range(self, x: torch.Tensor) -> torch.Tensor:
        """Attention among the pixels of each P_h x P_w block; H, W multiples of the group size."""
        ph, pw = self.down_factor
        gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
        t = rearrange(x, "b c (gh ph) (gw pw) -> (b gh gw) c ph pw", ph=ph, pw=pw)
        t = self.local_relation(t)
        return rearrange(t, "(b gh gw) c ph pw -> b c (gh ph) (gw pw)", gh=gh, gw=gw)

    def relation(self, x: torch.Tensor) -> torch.Tensor:
        """Both steps on any (B, C, H, W) map (no residual): the body of mmseg's ISAHead."""
        (ph, pw), (h, w) = self.down_factor, x.shape[-2:]
        pad_h, pad_w = _group_count(h, ph) * ph - h, _group_count(w, pw) * pw - w
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)  # centred, as mmseg
        exporting = is_exporting()
        if exporting or pad_h or pad_w:  # an exported graph serves every H, W: it always pads
            x = F.pad(x, pads)
        out = self.short_range(self.long_range(x))
        # Exported, a negative pad crops: slices at symbolic offsets would add guards on H, W.
        return F.pad(out, [-p for p in pads]) if exporting else unpad(out, pads)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out_proj(self.relation(x))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, down_factor={self.down_factor}"
