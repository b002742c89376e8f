"""Linear-attention mixer cores: a kernel feature map of the pretrained q and k through
:func:`visattn.layers.linear_attention.linear_attention`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..linear_attention import (
    elu_feature_map,
    favor_plus_features,
    linear_attention,
    orthogonal_gaussian,
    trig_random_features,
)
from .base import MixerCore

__all__ = ["KernelCore"]


class KernelCore(MixerCore):
    """Linear attention φ(q)(φ(k)ᵀv) of every patch over all tokens (prefix included), with the kernel of
    the method: ``elu`` (Katharopoulos et al.), ``favor+`` (Performer: positive orthogonal random
    features of softmax's kernel exp(q·k/√d)), ``trig`` (Performer v1), ``efficient`` (Efficient
    Attention: softmax of q over its channels, of k over the tokens), ``cosine`` (FANet: l2-normalised q and k, no softmax, divided by the key count), ``dpfp`` (DPFP's deterministic
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
            from ...attn.dpfp import dpfp_features  # the block owns the feature map

            fq, fk = dpfp_features(qp, self.nu), dpfp_features(k, self.nu)
        elif self.kernel == "cosine":
            # FANet: cosine similarity without softmax, (1/n)·Q̂(K̂ᵀV), n the number of keys (prefix included).
            qn, kn = F.normalize(qp, dim=-1), F.normalize(k, dim=-1)
            return qn @ (kn.transpose(-1, -2) @ v) / k.shape[2]
        else:  # efficient: both normalisations are softmaxes, so no denominator is needed
            fq, fk = qp.softmax(dim=-1), k.softmax(dim=-2)
            return fq @ (fk.transpose(-1, -2) @ v)
        return linear_attention(fq, fk, v)
