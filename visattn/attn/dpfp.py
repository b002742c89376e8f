"""Linear Transformers Are Secretly Fast Weight Programmers (DPFP, delta rule)
— https://arxiv.org/abs/2102.11174

Sequence method on the flattened map (raster order): pre-norm tokens plus a fixed 2D sin-cos
position code, multi-head attention with the deterministic parameter-free projection (DPFP)
feature map. causal=True is the paper's fast-weight programmer with the delta rule along the
raster scan (chunked parallel form, visattn.layers.delta_rule); the delta rule needs an order,
so the non-causal form is global linear attention with DPFP features (see the class docstring).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import accuracy_dtype, factory_kwargs
from ..layers.delta_rule import delta_rule
from ..layers.linear_attention import KernelAttnBlock
from ..registry import register_attn


def dpfp_features(x: torch.Tensor, nu: int) -> torch.Tensor:
    """DPFP: r = ReLU([x, −x]) ∈ R^{2d}, φ_ν(x) = [r ⊙ roll(r, 1), …, r ⊙ roll(r, ν)] ∈ R^{2dν}.

    Each feature is a product of two entries of r, and r_i, r_{i+d} are never both non-zero: the
    features are non-negative and sparse, each active on its own region of the input space (the
    paper's motivation: near-orthogonal keys, hence less interference in the fast weights).
    """
    r = F.relu(torch.cat([x, -x], dim=-1))
    return torch.cat([r * r.roll(j, dims=-1) for j in range(1, nu + 1)], dim=-1)


def sum_normalize(phi: torch.Tensor, eps: float) -> torch.Tensor:
    """φ / Σφ (the paper's normalisation for the delta rule); Σφ clamped at eps, where φ is all
    (or nearly) zero, so such a key writes nothing and such a query reads nothing."""
    return phi / phi.sum(-1, keepdim=True).clamp_min(eps)


@register_attn(
    "dpfp",
    title="Linear Transformers Are Secretly Fast Weight Programmers",
    arxiv="2102.11174",
    year=2021,
    family="linear",
    complexity="O(N·D²ν)",
    flops_exponent=1.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="DPFP features (ReLU([x,−x]) times its rolls); causal: fast weights written by the delta rule",
    reference="https://github.com/ischlag/fast-weight-transformers",
)
class DPFP(KernelAttnBlock):
    """DPFP fast-weight attention, residual and identity at initialisation.

    causal=True (the paper's method): fast weights W (Dv x 2dν) per head, written in raster order
    by the delta rule with sum-normalised DPFP features φ' = φ/Σφ and a learned write strength
    β_i = sigmoid(w_β·x_i + b_β) (one per head):

        v̄_i = W_{i−1} φ'(k_i),  W_i = W_{i−1} + β_i (v_i − v̄_i) φ'(k_i)ᵀ,  y_i = W_i φ'(q_i).

    No attention denominator (the sum normalisation replaces it, as in the paper).

    causal=False: the delta rule is order dependent (a later write replaces what an earlier key
    stored; β is its learning rate), and an image has no order, so the non-causal form keeps the
    DPFP kernel and DROPS the delta rule: it is the sum update rule, i.e. normalised global linear
    attention y_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j) over all N tokens with raw
    (not sum-normalised) φ, the paper's sum-rule baseline with DPFP features. No β there, hence
    no β parameters.

    Args:
        channels: input channels C.
        heads: attention heads (default: heads of 32 channels, ``default_heads``).
        nu: ν, rolls of the DPFP map (features 2dν, d = head dim); the paper tries 1 to 3, and
            its update-rule (delta vs sum) experiments use ν = 1.
        eps: denominator epsilon (non-causal) and floor of the sum normalisation (causal).
        chunk_size: chunk length of the chunked delta rule, speed/memory only; None (default) chooses it for the device
            at call time (visattn.layers.linear_attention.default_chunk_size), an int overrides it.
        causal: raster-order causal attention with the delta rule.
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        nu: int = 1,
        eps: float = 1e-6,
        chunk_size: int | None = None,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            channels,
            heads=heads,
            causal=causal,
            chunk_size=chunk_size,
            eps=eps,
            device=device,
            dtype=dtype,
        )
        name = self._block_name()
        if isinstance(nu, bool) or not isinstance(nu, int) or not 1 <= nu < 2 * self.head_dim:
            raise ValueError(
                f"{name}: nu must be an int in [1, 2·head_dim = {2 * self.head_dim}), got {nu!r}"
            )
        self.nu = nu
        # β_i per head from the token (the paper's W_β x_i); only the delta rule has it.
        self.beta = nn.Linear(channels, self.heads, **factory_kwargs(device, dtype)) if self.causal else None

    def features(self, q: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor):
        return dpfp_features(q, self.nu), dpfp_features(k, self.nu), None

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.causal:
            return super().attend(tokens)
        qkv = rearrange(self.qkv(tokens), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k, v = qkv.unbind(0)
        beta = rearrange(torch.sigmoid(self.beta(tokens)), "b n h -> b h n")
        dt = accuracy_dtype(q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            qf, kf, _ = self.features(q.to(dt), k.to(dt), tokens)
            qf, kf = sum_normalize(qf, self.eps), sum_normalize(kf, self.eps)
            out = delta_rule(qf, kf, v.to(dt), beta.to(dt), chunk_size=self.chunk_size)
        return rearrange(out, "b h n d -> b n (h d)").to(tokens.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nu={self.nu}"
