"""Kernel feature maps and (causal) linear attention, shared by every linear-attention block.

Linear attention replaces softmax(q·k) by a kernel φ(q)·φ(k), so that

    out_i = Σ_j φ(q_i)·φ(k_j) v_j / Σ_j φ(q_i)·φ(k_j)

is computed as φ(Q)(φ(K)ᵀV) in O(N·Dk·Dv) instead of O(N²·D). The pieces:

Feature maps (inputs ``(..., N, d)``; the random ones take a ``(m, d)`` projection):
    :func:`elu_feature_map`           elu(x) + 1 (Transformers are RNNs).
    :func:`relu_kernel_features`      ReLU(xWᵀ) + eps (Performer's generalised kernel).
    :func:`favor_plus_features`       positive random features of exp(q·k) (FAVOR+).
    :func:`trig_random_features`      sin/cos random features of exp(q·k) (Performer v1 / FAVOR).
    :func:`orthogonal_gaussian`       block-orthogonal Gaussian projections (ORF), seeded.
    :class:`RandomFeatures`           a projection in a buffer, redrawn in training at an interval.

Attention:
    :func:`linear_attention`          normalised, non-causal or causal, optional per-step decay.
    :func:`causal_linear_scan`        the unnormalised causal core, for gated / custom variants.

Blocks:
    :class:`KernelAttnBlock`          a (B, C, H, W) block: pre-norm, 2D sin-cos position, q/k/v,
                                      ``features()`` (the method), linear attention, zero-init output.

The causal form is a chunked scan: inside a chunk of L tokens the masked (L x L) product is
computed directly, between chunks a (Dk x Dv) state is carried. It never builds an (N, Dk, Dv)
tensor (the per-token prefix sums of the papers' RNN form) and never an (N, N) one; autograd keeps
O(N·L + N/L·Dk·Dv) per head, and ``recompute=True`` keeps only q, k, v (SLiM).

Per-step decay: ``log_decay`` g (shape ``(..., N)``, g <= 0) turns the prefix sum into the
recurrence S_i = exp(g_i) S_{i-1} + k_i v_iᵀ, out_i = q_iᵀ S_i. Gated variants (RFA's gate,
RetNet-style decay) pass it directly; the exp-feature maps use it to keep the keys' running max
out of the exponent, which keeps the causal form exact *and* overflow-free (see :func:`favor_plus_features`).
A delta-rule (DPFP) variant needs its own within-chunk solve but can reuse the chunking and
the block base class.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .attention import resolve_heads
from .block import AttnBlock, factory_kwargs
from .pos_embed import sincos_2d
from .precision import accuracy_dtype
from .tokens import to_map, to_tokens

__all__ = [
    "elu_feature_map",
    "relu_kernel_features",
    "favor_plus_features",
    "trig_random_features",
    "key_stabilizer",
    "orthogonal_gaussian",
    "RandomFeatures",
    "linear_attention",
    "causal_linear_scan",
    "CHUNK_RULES",
    "default_chunk_size",
    "check_chunk_size",
    "KernelAttnBlock",
]


# --------------------------------------------------------------------------------------------
# Feature maps
# --------------------------------------------------------------------------------------------


class _EluPlusOne(torch.autograd.Function):
    """elu(x) + 1 whose backward needs only the output: d/dx = min(φ(x), 1). The output is kept
    for the attention products anyway, so the pre-activation q/k need not be saved as well."""

    @staticmethod
    def forward(ctx, x):
        y = F.elu(x) + 1.0
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy * y.clamp_max(1.0)


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ(x) = elu(x) + 1 (Katharopoulos et al.), positive everywhere."""
    return _EluPlusOne.apply(x)


def relu_kernel_features(x: torch.Tensor, projection: torch.Tensor, *, eps: float = 1e-3) -> torch.Tensor:
    """Performer's generalised-attention features φ(x) = ReLU(x Wᵀ) + eps, W of shape (m, d).

    ``eps`` (the papers' 1e-3) keeps every denominator positive.
    """
    return F.relu(x @ projection.to(x).transpose(-1, -2)) + eps


def key_stabilizer(log_scale: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shift that keeps exp-features of keys finite, without changing the attention.

    ``log_scale`` (..., N) is each key's largest log-feature. Non-causal: one shift per sequence
    (its max), which cancels exactly between numerator and denominator. Causal: a shared shift
    would depend on future keys, so the shift is the running max s_j over keys <= j, and the
    returned ``log_decay`` g_j = s_{j-1} - s_j (<= 0) rescales the carried state so that every
    key is, in effect, divided by the same exp(s_i) for query i: exact, causal and overflow-free.
    Returns ``(shift (..., N) or (..., 1), log_decay or None)``. The shift keeps whatever gradient
    ``log_scale`` has: the normalised output is shift-free only without ``eps`` and the denominator
    clamp, and trigonometric features (whose denominators come near 0) make that difference large, so a
    detached shift gave performer_v1 a gradient 14 % off finite differences; positive features pass a
    detached ``log_scale`` (see :func:`favor_plus_features`).
    """
    if not causal:
        return log_scale.amax(-1, keepdim=True), None
    shift = log_scale.cummax(-1).values
    log_decay = F.pad(shift[..., :-1] - shift[..., 1:], (1, 0))
    return shift, log_decay


def favor_plus_features(
    q: torch.Tensor, k: torch.Tensor, projection: torch.Tensor, *, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Positive random features of the softmax kernel (FAVOR+, Choromanski et al. 2009.14794).

    φ(x) = exp(ωᵢᵀx − ‖x‖²/2) for the rows ωᵢ of ``projection`` (m, d), with x = q·d^{-1/4} and
    k·d^{-1/4}, so that E[φ(q)·φ(k)] ∝ exp(q·k/√d), softmax attention's kernel. Constant factors
    that cancel in the normalised attention are dropped: 1/√m, and each query's max (the query's
    ‖q‖²/2 with it). Keys are shifted by :func:`key_stabilizer`; pass the returned ``log_decay`` to
    :func:`linear_attention` (it is None when not causal).

    Returns ``(φ(q), φ(k), log_decay)`` with features of size m.

    The shifts are taken without gradient, unlike the trigonometric features': with positive features a
    shift rescales numerator and denominator alike and only the ``eps`` of the normalisation sees it, so
    its gradient is within finite-difference tolerance of zero (the contract's float64 check passes), and
    the max's backward (a full-size mask, sum and division over the logits) was 28 % of slim's training
    step at 64x64 on the CPU.
    """
    scale = q.shape[-1] ** -0.25
    w = projection.to(q).transpose(-1, -2)
    q_logits = (q * scale) @ w
    q_feat = torch.exp(q_logits - q_logits.detach().amax(-1, keepdim=True))
    ks = k * scale
    k_logits = ks @ w - 0.5 * (ks * ks).sum(-1, keepdim=True)
    shift, log_decay = key_stabilizer(k_logits.detach().amax(-1), causal)
    k_feat = torch.exp(k_logits - shift.unsqueeze(-1))
    return q_feat, k_feat, log_decay


def trig_random_features(
    q: torch.Tensor, k: torch.Tensor, projection: torch.Tensor, *, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Trigonometric random features of the softmax kernel (FAVOR, Performer v1, 2006.03555).

    exp(qᵀk) = exp(‖q‖²/2) · exp(−‖q−k‖²/2) · exp(‖k‖²/2) and the Gaussian kernel is
    E[cos ωᵀ(q−k)] = E[sin ωᵀq sin ωᵀk + cos ωᵀq cos ωᵀk], so φ(x) = exp(‖x‖²/2)[sin ωx, cos ωx]
    (x = q·d^{-1/4}, k·d^{-1/4}). The query factor exp(‖q‖²/2) cancels in the normalisation and is
    dropped; the key factor is kept, shifted by :func:`key_stabilizer`. Features are not positive:
    denominators can be <= 0 (the method's known weakness; :func:`linear_attention` clamps them).

    Returns ``(φ(q), φ(k), log_decay)`` with features of size 2m.
    """
    scale = q.shape[-1] ** -0.25
    w = projection.to(q).transpose(-1, -2)
    qp = (q * scale) @ w
    q_feat = torch.cat([qp.sin(), qp.cos()], dim=-1)
    ks = k * scale
    kp = ks @ w
    log_norm = 0.5 * (ks * ks).sum(-1)
    shift, log_decay = key_stabilizer(log_norm, causal)
    k_feat = torch.cat([kp.sin(), kp.cos()], dim=-1) * torch.exp(log_norm - shift).unsqueeze(-1)
    return q_feat, k_feat, log_decay


def orthogonal_gaussian(
    num_features: int,
    dim: int,
    *,
    orthogonal: bool = True,
    scaling: str = "chi",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A (num_features, dim) matrix of random projections ω (on the CPU).

    ``orthogonal``: rows are exactly orthogonal within each block of ``dim`` rows (ORF, Yu et al.),
    from the QR of a Gaussian matrix with the sign fix that makes it Haar-distributed; otherwise
    independent directions. ``scaling``: "chi" gives row norms of d-dimensional Gaussian vectors
    (so each row is marginally N(0, I), unbiased estimators); "sqrt_d" gives every row norm √d.
    """
    if num_features < 1 or dim < 1:
        raise ValueError(f"orthogonal_gaussian: sizes must be >= 1, got ({num_features}, {dim})")
    if scaling not in ("chi", "sqrt_d"):
        raise ValueError(f"orthogonal_gaussian: scaling must be 'chi' or 'sqrt_d', got {scaling!r}")
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        g = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        if orthogonal:
            qm, r = torch.linalg.qr(g)
            g = (qm * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)).transpose(0, 1)
        else:
            g = g / g.norm(dim=1, keepdim=True)
        blocks.append(g)
    directions = torch.cat(blocks)[:num_features]
    if scaling == "chi":
        norms = torch.randn(num_features, dim, generator=generator, dtype=torch.float64).norm(dim=1)
    else:
        norms = torch.full((num_features,), math.sqrt(dim), dtype=torch.float64)
    return (directions * norms.unsqueeze(1)).to(dtype)


@torch.library.custom_op("visattn::random_features_step", mutates_args=("weight", "calls"))
def _random_features_step(
    weight: torch.Tensor,
    calls: torch.Tensor,
    seed: torch.Tensor,
    interval: int,
    orthogonal: bool,
    scaling: str,
) -> None:
    """:meth:`RandomFeatures.step` in training: ``calls += 1``, and every ``interval`` calls ``weight``
    becomes draw ``calls // interval`` of :func:`orthogonal_gaussian` from a generator seeded ``seed`` plus
    that index (draw i of a layer is the same in every run, eager or compiled)."""
    calls += 1
    count = int(calls)
    if count % interval == 0:
        weight.copy_(_seeded_draw(*weight.shape, orthogonal, scaling, int(seed) + count // interval))


def _seeded_draw(num_features: int, dim: int, orthogonal: bool, scaling: str, seed: int) -> torch.Tensor:
    """:func:`orthogonal_gaussian` from a fresh CPU generator seeded ``seed`` (float32, CPU)."""
    gen = torch.Generator().manual_seed(seed)
    return orthogonal_gaussian(num_features, dim, orthogonal=orthogonal, scaling=scaling, generator=gen)


class RandomFeatures(nn.Module):
    """A random projection ω of shape (num_features, dim) in a buffer, drawn from a seeded generator.

    Deterministic and batch-independent: the draw depends only on ``seed`` and the draw index.
    In training, ``step()`` counts calls in the ``calls`` buffer and redraws every
    ``redraw_interval`` calls (0: never); in eval it does nothing. Draw i uses seed + i, so a
    run is reproducible and a loaded state_dict restores the current features.

    Args:
        num_features: m, rows of the projection.
        dim: d, the head dimension.
        orthogonal, scaling: see :func:`orthogonal_gaussian`.
        redraw_interval: training calls between redraws (0 disables redrawing).
        seed: base seed; None draws one from the global RNG (so ``torch.manual_seed`` governs it
            and two layers get different features).
    """

    def __init__(
        self,
        num_features: int,
        dim: int,
        *,
        orthogonal: bool = True,
        scaling: str = "chi",
        redraw_interval: int = 0,
        seed: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if redraw_interval < 0:
            raise ValueError(f"RandomFeatures: redraw_interval must be >= 0, got {redraw_interval}")
        self.num_features, self.dim = num_features, dim
        self.orthogonal, self.scaling, self.redraw_interval = orthogonal, scaling, redraw_interval
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.int64, device=device))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("weight", self.draw(0).to(device=device, dtype=dtype or torch.float32))

    def draw(self, index: int) -> torch.Tensor:
        """The projection of draw ``index`` (CPU, float32)."""
        return _seeded_draw(
            self.num_features, self.dim, self.orthogonal, self.scaling, int(self.seed) + index
        )

    @torch.no_grad()
    def step(self) -> None:
        """Count a training call and redraw when the interval is reached (call it in forward).

        The count and the redraw run in one custom op (:func:`_random_features_step`): whether to redraw
        depends on the counter's value and the draw needs a CPU generator, neither of which a compiled
        graph can hold, so ``torch.compile(fullgraph=True)`` keeps the op as one opaque call that mutates
        ``calls`` and ``weight`` (the same draws at the same calls as eager)."""
        if not self.training or self.redraw_interval == 0:
            return
        _random_features_step(
            self.weight, self.calls, self.seed, self.redraw_interval, self.orthogonal, self.scaling
        )

    def current(self) -> torch.Tensor:
        """The projection a forward should use: the buffer, or a copy of it while training with redraws.

        A redraw writes the buffer in place (so compiled graphs and checkpoints see one buffer). A graph
        that saved the buffer itself for its backward would then fail with "modified by an inplace
        operation" whenever a second forward redraws before the first one's backward (two views of a batch,
        a consistency loss). The copy is (m, d), negligible next to the features it multiplies."""
        if self.training and self.redraw_interval and torch.is_grad_enabled():
            return self.weight.clone()
        return self.weight

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, dim={self.dim}, redraw_interval={self.redraw_interval}"


# --------------------------------------------------------------------------------------------
# Linear attention
# --------------------------------------------------------------------------------------------


#: How :func:`default_chunk_size` picks the chunk length of the causal scans, by device type ("cuda", "cpu",
#: or "other" for every other device) and scan kind ("linear": :func:`causal_linear_scan`, "delta":
#: :func:`visattn.layers.delta_rule.delta_rule`): ``(scale, smallest, largest)`` gives
#: L = scale·√(Dk·Dv) rounded to a power of two, clamped to [smallest, largest]. Edit an entry to retune
#: every block at once.
CHUNK_RULES: dict[str, dict[str, tuple[float, int, int]]] = {
    "cuda": {"linear": (1.0, 64, 64), "delta": (1.0, 64, 64)},  # fla's Hopper choice; unmeasured here
    "cpu": {"linear": (1.0, 32, 128), "delta": (0.5, 32, 64)},  # measured, see default_chunk_size
    "other": {"linear": (1.0, 64, 64), "delta": (1.0, 64, 64)},  # as CUDA: an accelerator, unmeasured
}


def default_chunk_size(
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim_k: int,
    head_dim_v: int,
    kind: str = "linear",
) -> int:
    """Chunk length of a causal scan on ``device``: what a block's ``chunk_size=None`` stands for.

    The one place where the chunk length is chosen (from :data:`CHUNK_RULES`). ``head_dim_k`` and
    ``head_dim_v`` are the scan's Dk (feature size of q and k) and Dv (value columns, the normaliser's
    included). The result of a scan does not depend on the chunk length, only its speed and memory.

    CUDA and other accelerators: 64 for both scans, flash-linear-attention's choice for Hopper-class
    GPUs. This is NOT measured here; ``tools/gpu_sweep.py`` measures it with
    :func:`visattn.bench.chunks.sweep_chunk_sizes` when a device session runs.

    CPU: L ≈ √(Dk·Dv) for linear attention (32 to 128) and half that for the delta rule (32 to 64),
    from ``sweep_chunk_sizes`` on a shared 2-core CPU (1 thread, float32, 4 sequences of 4096 tokens,
    3 to 5 interleaved rounds; fwd+bwd time relative to the fastest size, L: ratio):

    ======================  =============================================
    linear, Dk = Dv = 16    16: 1.20, 32: 1.00, 64: 1.19, 128: 2.50
    linear, Dk = Dv = 32    16: 2.30, 32: 1.00, 64: 1.41, 128: 2.18
    linear, Dk = Dv = 64    16: 3.10, 32: 1.19, 64: 1.00, 128: 1.07
    linear, Dk = Dv = 128   32: 2.16, 64: 1.35, 128: 1.00, 256: 1.15 (2 x 2048 tokens)
    linear, Dk=110, Dv=33   32: 1.44, 64: 1.00, 128: 1.09 (Performer's features)
    delta, Dk = Dv = 16     16: 1.00, 32: 1.01, 64: 1.60, 128: 2.81
    delta, Dk = Dv = 32     16: 1.26, 32: 1.00, 64: 1.19, 128: 2.20
    delta, Dk = Dv = 64     16: 1.19, 32: 1.00, 64: 1.21, 128: 1.46
    delta, Dk = Dv = 128    32: 1.18, 64: 1.00, 128: 1.39, 256: 2.03 (2 x 2048 tokens)
    ======================  =============================================

    Small chunks lose to the many (Dk x Dv) chunk states, large ones to the quadratic work inside a
    chunk; the balance moves with the state size Dk·Dv, hence the rule. The one close call is linear
    attention at Dk = Dv = 32 (the linear block's default heads): repeated 32-vs-64 runs gave time
    ratios 32/64 of 0.71 (the run above, machine load ~2) and 0.97, 1.06, 1.16, 1.16, 1.19, 1.35 under
    load ~5.5 (5 to 9 rounds, 1024 to 16384 tokens): a tie within this machine's noise, so the rule's
    32 stands there. The delta rule's 32 beat 64 in every run (by 1.19 to 1.35). ``dtype`` does not change the
    choice: the scans compute in float32 at least (float16/bfloat16 are promoted), and float64 on the
    CPU ranked the sizes as float32 did (Dk = Dv = 32: linear 32: 1.00, 64: 1.04; delta 16: 1.00,
    32: 1.04, 64: 1.74). It is a parameter so that a measured dtype dependence (on a GPU) has its place.
    """
    if kind not in ("linear", "delta"):
        raise ValueError(f"default_chunk_size: kind must be 'linear' or 'delta', got {kind!r}")
    for value, what in ((head_dim_k, "head_dim_k"), (head_dim_v, "head_dim_v")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"default_chunk_size: {what} must be a positive int, got {value!r}")
    scale, smallest, largest = CHUNK_RULES.get(torch.device(device).type, CHUNK_RULES["other"])[kind]
    # nearest power of two on a log scale (half-up, not Python's round-half-even)
    exponent = math.floor(math.log2(scale * math.sqrt(head_dim_k * head_dim_v)) + 0.5)
    return min(max(2**exponent, smallest), largest)


def check_chunk_size(chunk_size: int | None, owner: str) -> int | None:
    """``chunk_size`` unchanged when it is None (chosen per device) or a positive int; ValueError naming
    ``owner`` (a block or function) otherwise."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"{owner}: chunk_size must be a positive int or None (None: chosen for the device by "
            f"visattn.layers.linear_attention.default_chunk_size), got {chunk_size!r}"
        )
    return chunk_size


def _chunk_prep(q, k, v, g, L):
    """Chunked views, the intra-chunk decay matrix and per-chunk quantities shared by fwd/bwd."""
    qc, kc, vc = (rearrange(t, "... (c l) d -> ... c l d", l=L) for t in (q, k, v))
    mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    if g is None:
        return qc, kc, vc, mask.to(q.dtype), None, None, None
    b = rearrange(g, "... (c l) -> ... c l", l=L).cumsum(-1)
    decay = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~mask, float("-inf")).exp()
    b_last = b[..., -1:]
    return qc, kc, vc, decay, b.exp().unsqueeze(-1), (b_last - b).exp().unsqueeze(-1), b_last[..., 0]


#: How the decayed chunk-state recurrence runs: "doubling" (log2(chunks) whole-tensor steps: few, large
#: kernels, for accelerators), "loop" (one small step per chunk: the fewest FLOPs, for the CPU, where
#: a step costs no launch) or "auto" (doubling except on the CPU). Set it to override the choice.
DECAY_SCAN = "auto"


def _decayed_prefix(x: torch.Tensor, log_a: torch.Tensor) -> torch.Tensor:
    """y[c] = x[c] + exp(log_a[c]) · y[c-1] (y[-1] = 0) for x (..., c, P, Q) and log_a (..., c).

    "doubling" (see :data:`DECAY_SCAN`): log2(c) steps (Hillis-Steele) of whole-tensor ops instead of a
    loop over the c chunks: after the step of width w, x[c] holds the terms of the w chunks ending at c
    and log_a[c] their total log decay, so one shifted, decayed add doubles the span. It does
    log2(c) times the FLOPs of the loop, which only pays where the loop's many small steps cost launches.
    """
    if DECAY_SCAN not in ("auto", "loop", "doubling"):
        raise ValueError(
            "visattn.layers.linear_attention.DECAY_SCAN must be 'auto', 'loop' or 'doubling', "
            f"got {DECAY_SCAN!r}"
        )
    if DECAY_SCAN == "loop" or (DECAY_SCAN == "auto" and x.device.type == "cpu"):
        ys = [x[..., 0, :, :]]
        for c in range(1, x.shape[-3]):  # a recurrence over chunks (N / L steps), not over tokens
            ys.append(x[..., c, :, :] + log_a[..., c, None, None].exp() * ys[-1])
        return torch.stack(ys, dim=-3)
    n, w = x.shape[-3], 1
    while w < n:
        x = x + log_a.exp()[..., None, None] * F.pad(x[..., :-w, :, :], (0, 0, 0, 0, w, 0))
        log_a = log_a + F.pad(log_a[..., :-w], (w, 0))
        w *= 2
    return x


def _chunk_states(kc, vc, k_w, log_a):
    """State entering each chunk, (..., c, Dk, Dv): exclusive (decayed) prefix sum of chunk updates;
    ``log_a`` (..., c) is each chunk's total log decay (None: no decay)."""
    upd = (kc if k_w is None else kc * k_w).transpose(-1, -2) @ vc
    if log_a is None:
        return F.pad(upd.cumsum(-3)[..., :-1, :, :], (0, 0, 0, 0, 1, 0))
    return F.pad(_decayed_prefix(upd, log_a)[..., :-1, :, :], (0, 0, 0, 0, 1, 0))


def _scan_forward(q, k, v, g, L):
    qc, kc, vc, decay, q_w, k_w, log_a = _chunk_prep(q, k, v, g, L)
    states = _chunk_states(kc, vc, k_w, log_a)
    out = ((qc @ kc.transpose(-1, -2)) * decay) @ vc + (qc if q_w is None else qc * q_w) @ states
    return rearrange(out, "... c l d -> ... (c l) d")


class _RecomputedScan(torch.autograd.Function):
    """Causal scan that saves only its inputs and recomputes chunk states in backward (SLiM)."""

    @staticmethod
    def forward(ctx, q, k, v, g, L):
        ctx.L = L
        ctx.save_for_backward(q, k, v, g)
        return _scan_forward(q, k, v, g, L)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, g = ctx.saved_tensors
        L = ctx.L
        qc, kc, vc, decay, q_w, k_w, log_a = _chunk_prep(q, k, v, g, L)
        states = _chunk_states(kc, vc, k_w, log_a)
        doc = rearrange(dout, "... (c l) d -> ... c l d", l=L)
        qd = qc if q_w is None else qc * q_w
        kd = kc if k_w is None else kc * k_w
        direct = qd.transpose(-1, -2) @ doc  # gradient reaching each chunk's entering state directly
        # r[c]: gradient w.r.t. the state leaving chunk c (= entering chunk c + 1).
        if log_a is None:
            r = F.pad(direct.flip(-3).cumsum(-3).flip(-3)[..., 1:, :, :], (0, 0, 0, 0, 0, 1))
        else:
            # r[c] = direct[c + 1] + a[c + 1] · r[c + 1]: the forward's decayed prefix run backwards.
            shifted = F.pad(direct[..., 1:, :, :], (0, 0, 0, 0, 0, 1))
            log_a_rev = F.pad(log_a.flip(-1)[..., :-1], (1, 0))
            r = _decayed_prefix(shifted.flip(-3), log_a_rev).flip(-3)
        p = (doc @ vc.transpose(-1, -2)) * decay
        scores = (qc @ kc.transpose(-1, -2)) * decay
        dq = doc @ states.transpose(-1, -2)
        dq = (dq if q_w is None else dq * q_w) + p @ kc
        dk = vc @ r.transpose(-1, -2)
        dk = (dk if k_w is None else dk * k_w) + p.transpose(-1, -2) @ qc
        dv = scores.transpose(-1, -2) @ doc + kd @ r
        dq, dk, dv = (rearrange(t, "... c l d -> ... (c l) d") for t in (dq, dk, dv))
        dg = None
        if g is not None and ctx.needs_input_grad[3]:
            # With B = cumsum(g), out_i = Σ_j e^{B_i - B_j}(q_i·k_j)v_j, so dL/dB_t = q_t·dq_t - k_t·dk_t.
            db = (q * dq).sum(-1) - (k * dk).sum(-1)
            dg = db.flip(-1).cumsum(-1).flip(-1)
        return dq, dk, dv, dg, None


def causal_linear_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """Unnormalised causal linear attention: out_i = Σ_{j<=i} exp(G_i − G_j) (q_i·k_j) v_j.

    ``q``, ``k``: (..., N, Dk); ``v``: (..., N, Dv); ``log_decay`` g: (..., N), G = cumsum(g),
    g <= 0 (None: no decay, plain prefix sums). Chunked: quadratic inside chunks of ``chunk_size``
    tokens (None: :func:`default_chunk_size` for the tensors' device, dtype and head dims; the result
    does not depend on it), a (Dk, Dv) state between chunks. ``recompute=True`` saves only the inputs
    for backward and recomputes the chunk states there (memory for backward does not grow with Dk·Dv·N/L).
    """
    if check_chunk_size(chunk_size, "causal_linear_scan") is None:
        chunk_size = default_chunk_size(q.device, q.dtype, q.shape[-1], v.shape[-1], "linear")
    n = q.shape[-2]
    L = min(chunk_size, n)
    pad = (-n) % L
    if pad:  # zeros at the end: future of every real token, contribute nothing
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        log_decay = None if log_decay is None else F.pad(log_decay, (0, pad))
    if recompute and torch.is_grad_enabled():
        out = _RecomputedScan.apply(q, k, v, log_decay, L)
    else:
        out = _scan_forward(q, k, v, log_decay, L)
    return out[..., :n, :] if pad else out


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    log_decay: torch.Tensor | None = None,
    chunk_size: int | None = None,
    eps: float = 1e-6,
    normalize: bool = True,
    recompute: bool = False,
) -> torch.Tensor:
    """Normalised linear attention on feature-mapped queries and keys.

    out_i = Σ_j φq_i·φk_j v_j / (max(Σ_j φq_i·φk_j, 0) + eps), j over all tokens (non-causal,
    computed as φQ(φKᵀV)) or j <= i (causal, :func:`causal_linear_scan`, with the optional per-step
    ``log_decay`` applied to numerator and denominator alike).

    Args:
        q, k: features (..., N, Dk), e.g. from :func:`elu_feature_map`.
        v: values (..., N, Dv).
        causal: raster-order causal form.
        log_decay: (..., N) per-step log decay (causal only).
        chunk_size: chunk length of the causal scan (None: chosen for the device, see
            :func:`default_chunk_size`).
        eps: added to the denominator (the clamp at 0 only matters for sign-changing features).
        normalize: False returns the numerator alone.
        recompute: causal only; save only the inputs for backward (SLiM).

    Computed in float32 at least, with autocast off (half-precision prefix sums lose the small
    terms; bf16 elu+1 underflows to zero denominators); returns v's dtype.
    """
    if log_decay is not None and not causal:
        raise ValueError("linear_attention: log_decay needs causal=True (a decay needs an order)")
    check_chunk_size(chunk_size, "linear_attention")
    out_dtype = v.dtype
    dt = accuracy_dtype(v.dtype)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if not causal:
            out = q @ (k.transpose(-1, -2) @ v)
            if normalize:
                out = out / ((q @ k.sum(-2).unsqueeze(-1)).clamp_min(0) + eps)
            return out.to(out_dtype)
        # The denominator rides along as an extra all-ones value column: one scan for both.
        if normalize:
            v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        g = None if log_decay is None else log_decay.to(dt)
        out = causal_linear_scan(q, k, v, g, chunk_size=chunk_size, recompute=recompute)
        if normalize:
            out = out[..., :-1] / (out[..., -1:].clamp_min(0) + eps)
    return out.to(out_dtype)


# --------------------------------------------------------------------------------------------
# Block base
# --------------------------------------------------------------------------------------------


class KernelAttnBlock(AttnBlock):
    """Base of the kernel-attention blocks: a sequence method on the flattened map.

    tokens = LayerNorm(x) + sincos_2d (the 2D position: kernel attention alone is permutation
    invariant; a fixed per-position code cannot leak the future), multi-head q/k/v, the method's
    ``features()``, :func:`linear_attention`, and a zero-initialised output projection, so the block
    is ``x + attn(x)`` and exactly the identity at initialisation. The pre-norm is the Transformer
    block's own and keeps exp-features in range whatever the scale of x.

    Subclasses implement ``features(q, k, tokens) -> (φq, φk, log_decay | None)`` on per-head
    (B, h, N, d) tensors in float32 or float64 (``tokens`` (B, N, C) is there for gates).

    Args:
        channels: C.
        heads: number of heads (must divide C; default: heads of 32 channels, ``default_heads``).
        causal: raster-order causal attention.
        chunk_size: chunk length of the causal scan; None (default) chooses it for the device at call
            time (:func:`default_chunk_size`), an int overrides it. Speed and memory only, not the result.
        eps: denominator epsilon.
        recompute: save only q, k, v of the causal scan for backward.
        qkv_bias: bias of the q/k/v projection.
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        causal: bool = False,
        chunk_size: int | None = None,
        eps: float = 1e-6,
        recompute: bool = False,
        qkv_bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        name = self._block_name()
        heads = resolve_heads(channels, heads, name)
        check_chunk_size(chunk_size, name)
        if not eps > 0:
            raise ValueError(f"{name}: eps must be > 0, got {eps!r}")
        dd = factory_kwargs(device, dtype)
        self.heads, self.head_dim = heads, channels // heads
        self.causal, self.chunk_size, self.eps, self.recompute = bool(causal), chunk_size, eps, recompute
        self.norm = nn.LayerNorm(channels, **dd)
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def features(
        self, q: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, C) position-encoded tokens -> (B, N, C) attention output before the projection."""
        qkv = rearrange(self.qkv(tokens), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        # Contiguous per-head tensors make every later chunk/feature view share their storage.
        q, k, v = (t.contiguous() for t in qkv.unbind(0))
        dt = accuracy_dtype(q.dtype)
        with torch.autocast(q.device.type, enabled=False):
            qf, kf, log_decay = self.features(q.to(dt), k.to(dt), tokens)
            out = linear_attention(
                qf,
                kf,
                v.to(dt),
                causal=self.causal,
                log_decay=log_decay,
                chunk_size=self.chunk_size,
                eps=self.eps,
                recompute=self.recompute,
            )
        if out.dtype != tokens.dtype:
            # Saturate rather than overflow when narrowing to float16: a clamped denominator (the trig
            # features' known weakness) can exceed its range, and inf times the zero-initialised
            # projection is NaN.
            big = torch.finfo(tokens.dtype).max
            out = out.clamp(-big, big)
        return rearrange(out, "b h n d -> b n (h d)").to(tokens.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        tokens = self.norm(to_tokens(x)) + sincos_2d(h, w, c, device=x.device, dtype=x.dtype)
        return x + to_map(self.proj(self.attend(tokens)), h, w)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, heads={self.heads}, causal={self.causal}, "
            f"chunk_size={self.chunk_size}"
        )
