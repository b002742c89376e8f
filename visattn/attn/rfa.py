"""Random Feature Attention — https://arxiv.org/abs/2103.02143

Sequence method on the flattened map (raster order): pre-norm tokens plus a fixed 2D sin-cos
position code, multi-head linear attention with random Fourier (sin/cos) features of ℓ2-normalised
queries and keys. causal=True is RFA-Gate, the paper's gated recurrent variant, run along the raster
scan as a chunked scan with a per-token decay (visattn.layers.linear_attention).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import accuracy_dtype, factory_kwargs
from ..layers.linear_attention import KernelAttnBlock, RandomFeatures, linear_attention
from ..registry import register_attn


def rfa_features(x: torch.Tensor, omega: torch.Tensor, kernel: str = "softmax") -> torch.Tensor:
    """RFA's φ of unit-normalised x (..., h, N, d) with per-head projections ω (h, m, d).

    "softmax": φ(x) = √(1/m)[sin ωx̂, cos ωx̂], so that E[φ(x)·φ(y)] = exp(−‖σ⊙(x̂−ŷ)‖²/2) for
    ω = σ⊙ω̃, ω̃ ~ N(0, I): for unit vectors and σ = s·1 this is ∝ exp(s² x̂·ŷ), the softmax kernel
    at inverse temperature s². "arccos": φ(x) = √(1/m) ReLU(ωx̂) (the paper's RFA-arccos).
    """
    p = torch.einsum("...hnd,hmd->...hnm", F.normalize(x, dim=-1), omega.to(x))
    if kernel == "arccos":
        return F.relu(p) / math.sqrt(p.shape[-1])
    return torch.cat([p.sin(), p.cos()], dim=-1) / math.sqrt(p.shape[-1])


def divide_by_bounded_denominator(
    nd: torch.Tensor, sigma: torch.Tensor, total: torch.Tensor, eps: float
) -> torch.Tensor:
    """``nd[..., :-1] / D``: the numerator over the denominator estimate ``nd[..., -1:]`` clamped to the exact
    bounds of the kernel sum, [exp(−2 max σ²)·total, total] (``total``: the sum's largest value, the key count
    or the gated weight; ``sigma`` (h, 1, d)), bounds without gradient. Shared by the block and its ViT core."""
    with torch.no_grad():
        sigma_max = sigma.to(nd.dtype).abs().amax(-1, keepdim=True)  # (h, 1, 1)
        lower = torch.exp(-2.0 * sigma_max.square()) * total
    den = torch.minimum(torch.maximum(nd[..., -1:], lower), total)
    return nd[..., :-1] / (den + eps)


@register_attn(
    "rfa",
    title="Random Feature Attention",
    arxiv="2103.02143",
    year=2021,
    family="linear",
    complexity="O(N·m·D)",
    flops_exponent=1.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="softmax of unit q, k by random Fourier features, learned variance; causal: gated recurrence",
    reference="none",
)
class RFA(KernelAttnBlock):
    """RFA: out_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)·Σ_j φ(k_j), φ the random Fourier features of
    ℓ2-normalised q, k (:func:`rfa_features`), ω = σ ⊙ ω̃ with a learned σ per head and channel.

    causal=True is RFA-Gate (paper eq. 7): per head a scalar gate g_t = sigmoid(w_g·x_t + b_g) and

        S_t = g_t S_{t−1} + (1 − g_t) φ(k_t) v_tᵀ,   z_t = g_t z_{t−1} + (1 − g_t) φ(k_t),
        out_t = φ(q_t)ᵀ S_t / φ(q_t)·z_t,

    computed exactly by the chunked scan with log-decay log g_t and keys scaled by (1 − g_t).
    (Without a gate the causal form would be plain prefix sums; the gate is the paper's causal
    variant and is always on here.)

    Denominator (documented deviation, ``bound_denominator=True``): sin/cos features are not
    positive, so the estimate of D_i = φ(q_i)·z_i can be <= 0 or tiny and the output explode (the
    paper clamps it). The exact D_i is a kernel sum whose bounds are known: each kernel value lies in
    [exp(−2 max σ²), 1] for unit q, k, and the weights sum to W_i = N (non-causal) or
    1 − Π_{t<=i} g_t (gated), so the estimate is clamped to [exp(−2 max σ²)·W_i, W_i] before
    dividing (bounds without gradient). This only moves an estimate that is impossible towards the
    true value; with False the shared clamp max(D_i, 0) + eps is used.

    The random draws ω̃ (independent per head, i.i.d. Gaussian as in the paper) live in a buffer from
    a seeded generator; in training they are redrawn every ``redraw_interval`` calls (the paper
    resamples each training step), in eval they are fixed.

    Args:
        channels: input channels C.
        heads: attention heads (default: heads of 32 channels, ``default_heads``).
        num_features: random frequencies m per head (2m features for "softmax"); paper: 64.
        kernel: "softmax" (sin/cos features) or "arccos" (ReLU features, the paper's RFA-arccos).
        sigma_init: initial value of the learned σ (inverse temperature σ²); the paper starts at 1.
        gate_bias: initial gate bias b_g (causal only; 0 as in the paper's code: g ≈ 1/2).
        bound_denominator: clamp the denominator estimate to its exact bounds (see above).
        redraw_interval: training calls between redraws of ω̃ (paper: 1; 0 never redraws).
        seed: base seed of the draws (None: from the global RNG at construction).
        eps: denominator epsilon.
        chunk_size: chunk length of the causal scan; None (default) chooses it for the device
            at call time (visattn.layers.linear_attention.default_chunk_size), an int overrides it.
        causal: raster-order causal attention (RFA-Gate).
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        num_features: int = 64,
        kernel: str = "softmax",
        sigma_init: float = 1.0,
        gate_bias: float = 0.0,
        bound_denominator: bool = True,
        redraw_interval: int = 1,
        seed: int | None = None,
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
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if kernel not in ("softmax", "arccos"):
            raise ValueError(f"{name}: kernel must be 'softmax' or 'arccos', got {kernel!r}")
        if not (isinstance(sigma_init, (int, float)) and math.isfinite(sigma_init) and sigma_init > 0):
            raise ValueError(f"{name}: sigma_init must be a finite float > 0, got {sigma_init!r}")
        if not (isinstance(gate_bias, (int, float)) and math.isfinite(gate_bias)):
            raise ValueError(f"{name}: gate_bias must be a finite float, got {gate_bias!r}")
        if isinstance(redraw_interval, bool) or not isinstance(redraw_interval, int) or redraw_interval < 0:
            raise ValueError(f"{name}: redraw_interval must be an int >= 0, got {redraw_interval!r}")
        dd = factory_kwargs(device, dtype)
        self.num_features, self.kernel = num_features, kernel
        self.bound_denominator = bool(bound_denominator)
        self.random_features = RandomFeatures(
            self.heads * num_features,
            self.head_dim,
            orthogonal=False,
            redraw_interval=redraw_interval,
            seed=seed,
            device=device,
            dtype=dtype,
        )
        self.sigma = nn.Parameter(torch.full((self.heads, 1, self.head_dim), float(sigma_init), **dd))
        self.gate = None
        if self.causal:
            self.gate = nn.Linear(channels, self.heads, **dd)
            nn.init.xavier_uniform_(self.gate.weight)
            nn.init.constant_(self.gate.bias, float(gate_bias))

    def omega(self) -> torch.Tensor:
        """The current projections ω = σ ⊙ ω̃, (heads, m, d)."""
        w = rearrange(self.random_features.current(), "(h m) d -> h m d", h=self.heads)
        return self.sigma * w.to(self.sigma)

    def features(self, q: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor):
        omega = self.omega()
        qf, kf = rfa_features(q, omega, self.kernel), rfa_features(k, omega, self.kernel)
        if self.gate is None:
            return qf, kf, None
        logits = rearrange(self.gate(tokens.to(self.gate.weight.dtype)), "b n h -> b h n").to(q)
        # log g_t is the scan's per-step decay; (1 − g_t) = sigmoid(−a) scales the written key.
        return qf, kf * torch.sigmoid(-logits).unsqueeze(-1), F.logsigmoid(logits)

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.bound_denominator or self.kernel != "softmax":
            return super().attend(tokens)
        qkv = rearrange(self.qkv(tokens), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k, v = qkv.unbind(0)
        dt = accuracy_dtype(q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            qf, kf, log_decay = self.features(q.to(dt), k.to(dt), tokens)
            v = v.to(dt)
            # numerator and denominator from one scan: the denominator is an all-ones value column
            nd = linear_attention(
                qf,
                kf,
                torch.cat([v, torch.ones_like(v[..., :1])], dim=-1),
                causal=self.causal,
                log_decay=log_decay,
                chunk_size=self.chunk_size,
                normalize=False,
            )
            with torch.no_grad():
                if log_decay is None:
                    total = torch.full_like(nd[..., -1:], nd.shape[-2])
                else:
                    total = -torch.expm1(log_decay.cumsum(-1)).unsqueeze(-1)
            out = divide_by_bounded_denominator(nd, self.sigma, total, self.eps)
        return rearrange(out, "b h n d -> b n (h d)").to(tokens.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self.random_features.step()
        return super()._forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_features={self.num_features}, kernel={self.kernel!r}"
