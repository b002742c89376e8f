"""The delta rule (fast-weight update) as a chunked parallel scan.

The delta rule of Schlag, Irie & Schmidhuber (2102.11174) writes a value into a fast-weight memory
after first reading out (and replacing) what the key already retrieves:

    S_i = S_{i-1} + β_i k_i (v_i − S_{i-1}ᵀ k_i)ᵀ,   out_i = S_iᵀ q_i,   S_0 = 0,

with S of shape (Dk, Dv) (the paper's W is Sᵀ). Unlike the sum rule of linear attention, each
update depends on the state before it, so the state cannot be a prefix sum. Chunkwise form (the
WY / UT representation of DeltaNet, Yang et al. 2406.06484): inside a chunk of L tokens entering
with state S, every update is a rank-one term k_t u_tᵀ with "pseudo-values"

    u_t = β_t (v_t − Sᵀ k_t − Σ_{s<t} (k_s·k_t) u_s),

a unit lower-triangular system (I + diag(β) tril(K Kᵀ, −1)) U = diag(β)(V − K S). With T the
inverse of that matrix, U = U_v − W S with U_v = T diag(β) V and W = T diag(β) K independent of S,
so all chunks are solved in parallel; a loop over the N / L chunks then carries S ← S + Kᵀ U (a
Dk x Dv state, never an (N, Dk, Dv) tensor), and the outputs are Q S + tril(Q Kᵀ) U. Autograd
keeps O(N·L + N/L·Dk·Dv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .linear_attention import check_chunk_size, default_chunk_size
from .precision import accuracy_dtype

__all__ = ["delta_rule", "unit_lower_inverse"]


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """Inverse of unit lower-triangular matrices (..., L, L) by recursive doubling of the diagonal
    blocks, [[A11, 0], [A21, A22]]⁻¹ = [[X11, 0], [−X22 A21 X11, X22]] (blocked TRTRI): log2 L
    levels of batched matmuls.

    Entries of the inverse decay geometrically with the distance from the diagonal (products of
    many β k_s·k_t), and far below 1 they underflow into subnormal floats, which CPUs multiply
    tens of times slower. Every matmul operand is therefore flushed to 0 below √(smallest normal)
    (1e-19 in float32, 1e-154 in float64): such entries are far below the resolution of the unit
    diagonal, and products of the kept ones stay normal.
    """
    tiny = torch.finfo(a.dtype).tiny ** 0.5

    def flush(x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(x.abs() < tiny, 0.0)

    a = flush(a)
    n = a.shape[-1]
    p = 1 << max(n - 1, 0).bit_length()
    if p != n:  # pad to a power of two with an identity block: block-diagonal, inverse unchanged
        a = F.pad(a, (0, p - n, 0, p - n)) + F.pad(
            torch.eye(p - n, dtype=a.dtype, device=a.device), (n, 0, n, 0)
        )
    inv = torch.ones(*a.shape[:-2], p, 1, 1, dtype=a.dtype, device=a.device)  # the 1x1 diagonal blocks
    s = 1
    while s < p:
        blocks = torch.diagonal(
            rearrange(a, "... (i r) (j c) -> ... i j r c", r=2 * s, c=2 * s), dim1=-4, dim2=-3
        )
        a21 = rearrange(blocks, "... r c i -> ... i r c")[..., s:, :s]
        x11, x22 = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        x21 = -flush(flush(x22 @ a21) @ x11)
        top = torch.cat([x11, torch.zeros_like(x11)], dim=-1)
        inv = torch.cat([top, torch.cat([x21, x22], dim=-1)], dim=-2)
        s *= 2
    return inv[..., 0, :n, :n]


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Causal delta-rule fast-weight attention: out_i = S_iᵀ q_i (see the module docstring).

    Args:
        q, k: (..., N, Dk) queries and keys (already feature-mapped and, for DPFP, sum-normalised:
            the update is a contraction when β_i ‖k_i‖² <= 2).
        v: (..., N, Dv) values.
        beta: (..., N) write strengths β_i (the paper's sigmoid outputs, in (0, 1)).
        chunk_size: chunk length L (speed and memory only: the result does not depend on it); None
            chooses it for the device (:func:`visattn.layers.linear_attention.default_chunk_size`,
            kind "delta").

    Computed in float32 at least with autocast off (the triangular inverse and the carried state
    need the precision); returns v's dtype.
    """
    check_chunk_size(chunk_size, "delta_rule")
    if q.shape[:-1] != k.shape[:-1] or k.shape[:-1] != v.shape[:-1] or beta.shape != k.shape[:-1]:
        raise ValueError(
            f"delta_rule: expected q, k (..., N, Dk), v (..., N, Dv), beta (..., N), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(beta.shape)}"
        )
    out_dtype = v.dtype
    dt = accuracy_dtype(v.dtype)
    n, dv = v.shape[-2], v.shape[-1]
    if chunk_size is None:
        chunk_size = default_chunk_size(q.device, dt, k.shape[-1], dv, "delta")
    L = min(chunk_size, n)
    pad = (-n) % L
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, beta = q.to(dt), k.to(dt), v.to(dt), beta.to(dt)
        if pad:  # k = 0, β = 0 at the end: future of every real token, no update
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            beta = F.pad(beta, (0, pad))
        qc, kc, vc = (rearrange(t, "... (c l) d -> ... c l d", l=L) for t in (q, k, v))
        bc = rearrange(beta, "... (c l) -> ... c l", l=L).unsqueeze(-1)
        kt = kc.transpose(-1, -2)
        bk = bc * kc  # diag(β) K: scaling rows before the product keeps no (L, L) copy for backward
        t = unit_lower_inverse(torch.eye(L, dtype=dt, device=q.device) + (bk @ kt).tril(-1))
        u_v, w = t @ (bc * vc), t @ bk
        state = q.new_zeros(*k.shape[:-2], k.shape[-1], dv)
        states = []
        # A recurrence over chunks (N / L steps), not over tokens. unbind, not indexing: the
        # backward of c-th slices would each materialise a zero tensor of the full size.
        for kt_c, u_c, w_c in zip(kt.unbind(-3), u_v.unbind(-3), w.unbind(-3), strict=True):
            states.append(state)
            state = state + kt_c @ (u_c - w_c @ state)
        states = torch.stack(states, dim=-3)
        u = u_v - w @ states
        out = qc @ states + (qc @ kt).tril() @ u
        out = rearrange(out, "... c l d -> ... (c l) d")
    return (out[..., :n, :] if pad else out).to(out_dtype)
