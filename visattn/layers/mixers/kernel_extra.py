"""Kernel-attention mixer cores with parameters of their own: RFA (random Fourier features of unit q, k with a
learned variance) and DNL (whitened pairwise softmax plus a learned unary term)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..linear_attention import RandomFeatures, linear_attention
from ..precision import accuracy_dtype
from .base import BlockHolder, MixerCore

__all__ = ["RfaCore", "DnlCore"]


class RfaCore(MixerCore):
    """Random Feature Attention of every patch query over all tokens (prefix keys included, one joint kernel
    sum): out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)·Σ_j φ(k_j), φ the random Fourier features of the
    ℓ2-normalised pretrained q, k (:func:`visattn.attn.rfa.rfa_features`) with ω = σ ⊙ ω̃, ω̃ ~ N(0, I)
    drawn per head from ``seed`` and redrawn every ``redraw_interval`` training calls, σ a learned
    per-head, per-channel variance (the new parameter ``sigma``, initialised to ``sigma_init`` = 1 as in the
    paper). The denominator estimate is clamped to its exact bounds as in :class:`visattn.attn.rfa.RFA`.

    It does not approximate the pretrained softmax without fine-tuning: RFA's kernel exp(σ² q̂·k̂) sees
    only the directions of q and k, while the pretrained logits q·k/√d carry their norms, and no σ (one per
    head and channel) can restore a per-pair product of norms. So it has no dense limit and no
    error-to-dense trend; the pretrained q, k, v are used as they are and fine-tuning adapts σ.
    """

    def __init__(self, dim: int, heads: int, *, num_features: int = 64, kernel: str = "softmax",
                 sigma_init: float = 1.0, redraw_interval: int = 1, bound_denominator: bool = True,
                 seed: int = 0, eps: float = 1e-6) -> None:  # fmt: skip
        super().__init__(dim, heads)
        # The block validates these and names itself ("rfa: ...") with the accepted values.
        BlockHolder(
            "rfa",
            num_features=num_features,
            kernel=kernel,
            sigma_init=sigma_init,
            redraw_interval=redraw_interval,
            seed=seed,
        )
        self.num_features, self.kernel, self.sigma_init = num_features, kernel, float(sigma_init)
        self.bound_denominator, self.eps = bool(bound_denominator), float(eps)
        self.random_features = RandomFeatures(
            heads * num_features, self.head_dim, orthogonal=False, redraw_interval=redraw_interval, seed=seed
        )
        self.sigma = nn.Parameter(torch.empty(heads, 1, self.head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """σ = ``sigma_init`` (the paper starts the learned variance at 1)."""
        with torch.no_grad():
            self.sigma.fill_(self.sigma_init)

    def omega(self) -> torch.Tensor:
        """The current projections ω = σ ⊙ ω̃, (heads, m, d)."""
        w = rearrange(self.random_features.current(), "(h m) d -> h m d", h=self.heads)
        return self.sigma * w.to(self.sigma)

    def patches(self, q, k, v, grid, prefix):
        from ...attn.rfa import divide_by_bounded_denominator, rfa_features  # the block owns them

        self.random_features.step()
        dt = accuracy_dtype(q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            omega = self.omega().to(dt)
            qf = rfa_features(q[:, :, prefix:].to(dt), omega, self.kernel)
            kf = rfa_features(k.to(dt), omega, self.kernel)
            vd = v.to(dt)
            if not self.bound_denominator or self.kernel != "softmax":
                return linear_attention(qf, kf, vd, eps=self.eps).to(v.dtype)
            # Numerator and denominator in one product: the denominator is an all-ones value column.
            nd = linear_attention(qf, kf, torch.cat([vd, torch.ones_like(vd[..., :1])], -1), normalize=False)
            # sin/cos estimates of the kernel sum can be <= 0; the exact sum over the N keys of unit q, k
            # lies in [exp(-2 max σ²)·N, N] (as RFA.attend).
            total = nd.new_tensor(float(k.shape[2]))
            return divide_by_bounded_denominator(nd, self.sigma, total, self.eps).to(v.dtype)

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, kernel={self.kernel!r}"


class DnlCore(MixerCore):
    """Disentangled non-local attention of every patch query: a whitened pairwise term
    softmax_j((q_i − μq)·(k_j − μk) / (τ√d)) v plus a unary term softmax_j(w·k_j) v, one pooled vector per
    head added to every patch, as :class:`visattn.attn.dnl.DisentangledNonLocal`. μq, μk are the means of the
    pretrained q, k over the patch tokens (the pixels of the map, per sample); both softmaxes range over all
    keys, prefix keys included (the prefix rule). The paper derives the unary term as μqᵀk_j, a linear
    function of the key; the new parameter ``unary`` (heads, d) is its decoupled 1x1 projection of the
    head's keys, initialised as the official code leaves its ``conv_mask`` (nn.Conv2d's default); its bias
    is left out, being a constant under the softmax over keys.

    ``temperature`` τ defaults to 1 here: the pretrained logits already carry their scale 1/√d, while the
    paper's 0.05 sharpens freshly learned θ, φ. DNL is a different attention, not an approximation of
    softmax (its pairwise term is the pretrained attention with its unary part removed, plus a second
    pooled term), so it has no dense limit and needs fine-tuning.
    """

    def __init__(self, dim: int, heads: int, *, temperature: float = 1.0) -> None:
        super().__init__(dim, heads)
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not (math.isfinite(temperature) and temperature > 0)
        ):
            raise ValueError(
                f"dnl (ViT mixer): temperature must be a finite float > 0 (1.0 keeps the pretrained logits' "
                f"scale), got {temperature!r}"
            )
        self.temperature = float(temperature)
        self.unary = nn.Parameter(torch.empty(heads, self.head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The unary projection as nn.Conv2d(d, 1, 1)'s default weight init (DNL's code keeps it)."""
        nn.init.kaiming_uniform_(self.unary, a=math.sqrt(5))

    def patches(self, q, k, v, grid, prefix):
        qp = q[:, :, prefix:]
        # Whitening by the means over the patches of each sample (batch-independent).
        qc = (qp - qp.mean(dim=2, keepdim=True)).contiguous()  # contiguous: SDPA's fused kernels
        kc = (k - k[:, :, prefix:].mean(dim=2, keepdim=True)).contiguous()
        scale = self.head_dim**-0.5 / self.temperature
        pairwise = F.scaled_dot_product_attention(qc, kc, v, scale=scale)
        saliency = torch.einsum("bhnd,hd->bhn", k, self.unary.to(k)).softmax(dim=-1)
        return pairwise + (saliency.unsqueeze(-2) @ v)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
