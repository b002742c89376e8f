"""Permutohedral Attention Module for Efficient Non-Local Neural Networks — https://arxiv.org/abs/1907.00641

Native 2D (the paper's 3D module with one coordinate dropped): Gaussian-kernel attention
y_i = sum_j exp(-|f_i - f_j|²/2) v_j / sum_j exp(-|f_i - f_j|²/2) over learned features f of the
pixel and its scaled (row, col) position, evaluated in O(N) by splatting onto a permutohedral
lattice, blurring along its d + 1 axes and slicing back (Adams et al. 2010), in vectorised PyTorch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import AttnBlock, factory_kwargs
from ..registry import register_attn

__all__ = ["PermutohedralAttention", "permutohedral_filter"]

# Two 31-bit primes: a key hashes to (h1, h2) with h_k = sum_i (key_i mod p_k) * m_ki mod p_k, packed
# into one int64. The hash is linear, so a neighbour's hash is the vertex's hash plus the offset's.
_PRIMES = (2147483647, 2147483629)
_ATTEMPTS = 4


def _elevation(d: int, device, dtype) -> torch.Tensor:
    """(d + 1, d) matrix embedding features in the hyperplane sum(x) = 0 of R^(d+1), scaled so that one
    [1, 2, 1] blur per lattice axis approximates a unit-variance Gaussian (Adams et al.)."""
    k = torch.arange(d, device=device, dtype=torch.float64)
    scale = (d + 1) * math.sqrt(2.0 / 3.0) / torch.sqrt((k + 1) * (k + 2))
    i = torch.arange(d + 1, device=device, dtype=torch.float64).view(-1, 1)
    e = (k >= i).double() - i * (k == i - 1).double()
    return (e * scale).to(dtype)


def _hash(keys: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """(..., K) int64 keys -> (...) int64 codes; ``mult`` is (2, K) with entries in [1, p)."""
    parts = []
    for p, m in zip(_PRIMES, mult, strict=True):
        # (key mod p) * m < 2^62 and K such terms reduced mod p sum to < 2^35: no int64 overflow.
        parts.append(((keys.remainder(p) * m).remainder(p)).sum(-1).remainder(p))
    return parts[0] * 2**31 + parts[1]


def _shift_code(code: torch.Tensor, offset_code: torch.Tensor) -> torch.Tensor:
    """Hash of (key + offset) from the hashes of key and offset (the hash is linear per prime)."""
    lo_mask = 2**31 - 1
    h1 = ((code >> 31) + (offset_code >> 31)).remainder(_PRIMES[0])
    h2 = ((code & lo_mask) + (offset_code & lo_mask)).remainder(_PRIMES[1])
    return h1 * 2**31 + h2


def _lattice(keys: torch.Tensor, q: int):
    """Vertex ids of the enclosing-simplex keys and the blur neighbours of every vertex.

    Args:
        keys: (P, q + 1) int64: d + 1 lattice coordinates and the group (batch x head) index, which
            keeps groups on disjoint vertices.

    Returns:
        ids (P,) in [0, M), and neighbours (2, q, M) in [0, M] (direction +/-, axis, vertex) where M
        marks "not in the lattice".
    """
    gen = torch.Generator().manual_seed(0)
    d = q - 1
    # Blur axis j moves by +d on coordinate j and -1 on the others (and back); the group stays put.
    axis = torch.full((q, q + 1), -1, dtype=torch.long)
    axis[:, q] = 0
    axis[torch.arange(q), torch.arange(q)] = d
    axis = axis.to(keys.device)
    for _ in range(_ATTEMPTS):
        mult = torch.randint(1, _PRIMES[1], (2, q + 1), generator=gen).to(keys.device)
        codes, ids = torch.unique(_hash(keys, mult), return_inverse=True)
        m = codes.numel()
        vertices = keys.new_zeros(m, q + 1).index_copy_(0, ids, keys)
        if not torch.equal(vertices[ids], keys):
            continue  # two distinct keys share a code: rehash (probability ~ P² / 2^62)
        nbrs = []
        for off in torch.cat([axis, -axis]):
            want = _shift_code(codes, _hash(off, mult))
            pos = torch.searchsorted(codes, want).clamp(max=m - 1)
            # Exactness: a neighbour counts only if its key really is vertex + offset.
            found = (codes[pos] == want) & (vertices[pos] == vertices + off).all(-1)
            nbrs.append(torch.where(found, pos, m))
        return ids, torch.stack(nbrs).view(2, q, m)
    raise RuntimeError("permutohedral: lattice hash collisions in every attempt")


def permutohedral_filter(features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Normalised Gaussian filtering on the permutohedral lattice.

    Approximates ``out_i = sum_j k_ij v_j / sum_j k_ij`` with ``k_ij = exp(-|f_i - f_j|² / 2)``, in
    O(P·(d + 1)²·c) for P points with d-dim features. Gradients reach the features through the
    barycentric splat/slice weights (the exact derivative of the lattice approximation).

    Args:
        features: (G, N, d) features; G independent groups (batch x heads) that never share vertices.
        values: (G, N, c) values.

    Returns:
        (G, N, c), in float32 (or float64 for float64 inputs).
    """
    # The lattice runs in float32 (float64 for float64 input) even under autocast: bf16 features
    # would snap to few lattice cells.
    with torch.autocast(features.device.type, enabled=False):
        return _filter(features, values)


def _filter(features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    g, n, d = features.shape
    q = d + 1
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    elev = features.to(dtype) @ _elevation(d, features.device, dtype).T  # (G, N, q)
    with torch.no_grad():
        # Nearest remainder-0 lattice point, then the permutation (rank) sorting the residual.
        rem0 = torch.round(elev / q) * q
        rank = torch.argsort(torch.argsort(rem0 - elev, dim=-1, stable=True), dim=-1)
        rank = rank + (rem0.sum(-1, keepdim=True) / q).round().long()
        over, under = rank >= q, rank < 0
        rem0 = rem0 - q * over + q * under
        rank = rank - q * over + q * under
    delta = (elev - rem0) / q
    bary = torch.zeros(g, n, q + 1, device=elev.device, dtype=dtype)
    bary = bary.scatter_add(-1, d - rank, delta).scatter_add(-1, d + 1 - rank, -delta)
    bary = torch.cat([bary[..., :1] + 1 + bary[..., q:], bary[..., 1:q]], -1)  # (G, N, q)
    # The simplex's q vertices: rem0 + canonical[r][rank], canonical[r] = (r,...,r, r-q,...,r-q).
    r = torch.arange(q, device=elev.device).view(q, 1)
    keys = rem0.long().unsqueeze(-2) + r - q * (rank.unsqueeze(-2) > d - r)  # (G, N, q_r, q)
    group = torch.arange(g, device=elev.device).view(g, 1, 1, 1).expand(g, n, q, 1)
    ids, nbrs = _lattice(torch.cat([keys, group], -1).view(-1, q + 1), q)
    # Homogeneous coordinate: the filtered ones normalise the output (the reference omits it).
    v1 = torch.cat([values.to(dtype), values.new_ones(g, n, 1, dtype=dtype)], -1)
    sliced = _SplatBlurSlice.apply(v1.view(g * n, -1), bary.view(g * n, q), ids, nbrs).view(g, n, -1)
    return sliced[..., :-1] / sliced[..., -1:]


def _blur(grid: torch.Tensor, nbrs: torch.Tensor, reverse: bool) -> torch.Tensor:
    """[1, 2, 1] / 2 along each lattice axis (the scale cancels in the normalisation), in place on
    ``grid`` (M + 1, c) whose last row stays zero: it stands for neighbours missing from the lattice."""
    m = nbrs.shape[-1]
    for j in reversed(range(nbrs.shape[1])) if reverse else range(nbrs.shape[1]):
        step = grid.index_select(0, nbrs[0, j]).add_(grid.index_select(0, nbrs[1, j]))
        grid[:m].add_(step, alpha=0.5)
    return grid


class _SplatBlurSlice(torch.autograd.Function):
    """out = S(b) · Blur · S(b)ᵀ · v, with S(b) the (P, M) splat matrix holding the barycentric weights.

    Each axis' blur is symmetric (vertex k is m's + neighbour iff m is k's - neighbour), so the
    backward is the same blur in reverse axis order: gathers only, where autograd would scatter-add
    every blur step and save every splat and slice product."""

    @staticmethod
    def forward(ctx, v1, bary, ids, nbrs):
        (p, q), c1, m = bary.shape, v1.shape[1], nbrs.shape[-1]
        grid = v1.new_zeros(m + 1, c1).index_add_(
            0, ids, (v1.unsqueeze(1) * bary.unsqueeze(-1)).view(p * q, c1)
        )
        grid = _blur(grid, nbrs, reverse=False)
        ctx.save_for_backward(v1, bary, ids, nbrs, grid)
        return (bary.unsqueeze(1) @ grid.index_select(0, ids).view(p, q, c1)).squeeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        v1, bary, ids, nbrs, grid = ctx.saved_tensors
        (p, q), c1, m = bary.shape, v1.shape[1], nbrs.shape[-1]
        grad = grad.contiguous()
        # Slice: d bary from the blurred values; the splatted gradient goes back through the blur.
        d_bary = (grid.index_select(0, ids).view(p, q, c1) @ grad.unsqueeze(-1)).squeeze(-1)
        back = grad.new_zeros(m + 1, c1).index_add_(
            0, ids, (grad.unsqueeze(1) * bary.unsqueeze(-1)).view(p * q, c1)
        )
        rows = _blur(back, nbrs, reverse=True).index_select(0, ids).view(p, q, c1)
        # Splat: d v1 slices the back-blurred gradient; d bary pairs it with the values.
        d_v1 = (bary.unsqueeze(1) @ rows).squeeze(1)
        d_bary = d_bary + (rows @ v1.unsqueeze(-1)).squeeze(-1)
        return d_v1, d_bary, None, None


@register_attn(
    "permutohedral",
    title="Permutohedral Attention Module for Efficient Non-Local Neural Networks",
    arxiv="1907.00641",
    year=2019,
    family="hashing",
    complexity="O(N·(d+1)²·D) (d = filt_f lattice features; hashing adds an O(N·(d+1)·log N) sort)",
    flops_exponent=1.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="Gaussian-kernel non-local attention evaluated by splat-blur-slice on a permutohedral lattice",
    reference="https://github.com/SamuelJoutard/Permutohedral_attention_module",
    exportable=False,
    export_note=(
        "the lattice is built by hashing with a collision check and rehash loop on data (torch.equal: "
        "DataDependentOutputException in torch.export); past it, ONNX has no searchsorted (neighbour "
        "lookup) or stable sort, and the hash multipliers come from a torch.Generator in forward"
    ),
    compile_fullgraph=False,
)
class PermutohedralAttention(AttnBlock):
    """PAM: ``x + gamma * concat_k lattice_filter(f_k, v_k)`` with gamma = 0 at initialisation.

    f = LeakyReLU(1x1 conv([x; s * (row, col)])) split into ``n_split`` heads of ``filt_f`` features
    (s a learned per-axis scale of the centred pixel coordinates), v = 1x1 conv(x) split into heads of
    ``channels // n_split``. Each head filters its values with a normalised unit-variance Gaussian kernel
    on its features.

    Args:
        channels: input channels C.
        filt_f: lattice feature dimension d per head (paper: 8). Cost grows as (d + 1)²; keep it small.
        n_split: heads (paper: 2); must divide C. Each head outputs C // n_split channels (the paper's
            out_f, so that the heads concatenate back to C).
    """

    def __init__(
        self,
        channels: int,
        *,
        filt_f: int = 8,
        n_split: int = 2,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if filt_f < 1:
            raise ValueError(f"permutohedral: filt_f must be >= 1, got {filt_f}")
        if n_split < 1 or channels % n_split:
            raise ValueError(f"permutohedral: n_split must divide channels ({channels}), got {n_split}")
        dd = factory_kwargs(device, dtype)
        self.filt_f = filt_f
        self.n_split = n_split
        self.conv_feat = nn.Conv2d(channels + 2, filt_f * n_split, 1, **dd)
        self.conv_desc = nn.Conv2d(channels, channels, 1, **dd)
        # The reference draws this from randn; a fixed start keeps construction deterministic.
        self.scaling_spatial = nn.Parameter(torch.ones(1, 2, 1, 1, **dd))
        self.gamma = nn.Parameter(torch.zeros(1, **dd))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, filt_f={self.filt_f}, n_split={self.n_split}"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        rows = torch.arange(h, device=x.device, dtype=x.dtype) - h // 2
        cols = torch.arange(w, device=x.device, dtype=x.dtype) - w // 2
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).expand(b, 2, h, w)
        feat = F.leaky_relu(self.conv_feat(torch.cat([x, coords * self.scaling_spatial], 1)))
        desc = self.conv_desc(x)
        out = permutohedral_filter(
            rearrange(feat, "b (n d) h w -> (b n) (h w) d", n=self.n_split),
            rearrange(desc, "b (n c) h w -> (b n) (h w) c", n=self.n_split),
        )
        out = rearrange(out, "(b n) (h w) c -> b (n c) h w", n=self.n_split, h=h).to(desc.dtype)
        return x + self.gamma * out
