"""Non-local Neural Networks (embedded Gaussian) — https://arxiv.org/abs/1711.07971

Native 2D: every pixel attends to every pixel, softmax(θ(x)ᵀφ(x)) g(x), O(N²·D); the dense
baseline that every efficient block in the zoo is compared with.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import AttnBlock, factory_kwargs, to_map
from ..registry import register_attn


@register_attn(
    "nonlocal",
    title="Non-local Neural Networks",
    arxiv="1711.07971",
    year=2018,
    family="nonlocal",
    complexity="O(N²·D)",
    flops_exponent=2.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="embedded-Gaussian self-attention over all pixels, residual with a zero-initialised BN",
    reference="https://github.com/facebookresearch/video-nonlocal-net",
)
class NonLocal(AttnBlock):
    """Embedded-Gaussian non-local block: ``z = BN(W_z · softmax(θᵀφ) g) + x``.

    The paper adds a BatchNorm after W_z with its scale initialised to zero, so the block is the
    identity at initialisation. The paper's embedded Gaussian has no 1/sqrt(d) scaling; mmseg's
    NLHead uses it (``use_scale=True``).

    Args:
        channels: input channels C.
        reduction: inter channels = C // reduction (paper: 2).
        use_scale: divide the logits by sqrt(inter channels).
        sub_sample: max-pool φ and g by 2 (the paper's cheaper variant; 4x fewer keys).
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 2,
        use_scale: bool = False,
        sub_sample: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if reduction < 1 or channels // reduction < 1:
            raise ValueError(
                f"nonlocal: reduction must be in [1, channels], got {reduction} for {channels} channels"
            )
        dd = factory_kwargs(device, dtype)
        inter = channels // reduction
        self.inter_channels = inter
        self.use_scale = use_scale
        self.sub_sample = sub_sample
        self.theta = nn.Conv2d(channels, inter, 1, **dd)
        self.phi = nn.Conv2d(channels, inter, 1, **dd)
        self.g = nn.Conv2d(channels, inter, 1, **dd)
        self.out = nn.Conv2d(inter, channels, 1, **dd)
        self.norm = nn.BatchNorm2d(channels, **dd)
        nn.init.zeros_(self.norm.weight)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        keys, values = self.phi(x), self.g(x)
        if self.sub_sample:
            keys = F.max_pool2d(keys, 2, ceil_mode=True)
            values = F.max_pool2d(values, 2, ceil_mode=True)
        # contiguous: CUDA's fused SDPA kernels need a unit stride in the last dim, else the math path
        # materialises the N x N matrix (9 GiB instead of 0.2 GiB at a 128 x 256 map)
        q, k, v = (rearrange(t, "b c h w -> b 1 (h w) c").contiguous() for t in (self.theta(x), keys, values))
        scale = self.inter_channels**-0.5 if self.use_scale else 1.0
        y = F.scaled_dot_product_attention(q, k, v, scale=scale)
        y = to_map(y.squeeze(1), h, w)
        return x + self.norm(self.out(y))
