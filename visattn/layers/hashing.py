"""Locality-sensitive hashing and sort-based bucketing, shared by Reformer, SMYRF and clustered attention.

Conventions: tokens are rows of ``(..., N, d)`` tensors (the leading dims are batch and heads, so every
hash, sort and maximum is per sample and per head: batch-independent); ``R`` hash rounds give
``(..., R, N)`` bucket ids or sort keys.

* Random hash parameters live in buffers drawn from a seeded ``torch.Generator``
  (:func:`seeded_normal`, :func:`seeded_uniform`): eval output is deterministic and independent of the
  batch. :func:`hash_draw` returns the buffer in eval and a fresh draw of the same law in training,
  because the papers rehash at every step.
* Hash families: angular LSH ``argmax([xR; -xR])`` (:func:`angular_buckets`, with trax's factorised
  form for many buckets), E2LSH (:func:`e2lsh_project`) and the XBOX+ asymmetric transform that turns
  maximum inner product into nearest neighbour (:func:`xbox_plus`).
* Sort-and-chunk: :func:`sort_with_inverse`, :func:`gather_tokens` (gather per round; its inverse
  permutation scatters back), :func:`look_back` (each chunk with its predecessors; :func:`look_one_back` for one).
* Rounds: :func:`attend_lse` is softmax attention that also returns the log-normaliser (SDPA does not
  expose it, and it is needed with gradient), :func:`merge_rounds` combines rounds by logsumexp weights.
"""

from __future__ import annotations

import math

import torch

from .compat import is_exporting
from .precision import upcast_for_accuracy

__all__ = [
    "resolve_seed",
    "seeded_normal",
    "seeded_uniform",
    "hash_draw",
    "factor_buckets",
    "rotation_columns",
    "angular_buckets",
    "e2lsh_project",
    "xbox_plus",
    "stable_argsort",
    "sort_with_inverse",
    "gather_tokens",
    "look_back",
    "look_one_back",
    "attend_lse",
    "merge_rounds",
]


def resolve_seed(seed: int | None) -> int:
    """``seed``, or one drawn from the global RNG (so ``torch.manual_seed`` governs it and two layers differ)."""
    return int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)


def seeded_normal(shape: tuple[int, ...], seed: int, *, device=None, dtype=None) -> torch.Tensor:
    """Standard normal draw from a CPU generator seeded with ``seed`` (identical on every device)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype or torch.float32)


def seeded_uniform(shape: tuple[int, ...], seed: int, *, device=None, dtype=None) -> torch.Tensor:
    """Uniform [0, 1) draw from a CPU generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(shape, generator=g).to(device=device, dtype=dtype or torch.float32)


def hash_draw(buffer: torch.Tensor, training: bool, law: str = "normal") -> torch.Tensor:
    """The fixed ``buffer`` in eval; in training a fresh draw of the same law from the global RNG."""
    if not training:
        return buffer
    return torch.randn_like(buffer) if law == "normal" else torch.rand_like(buffer)


def factor_buckets(n_buckets: int, max_factor: int = 128) -> tuple[int, ...]:
    """Bucket factors as in the authors' trax code: one factor up to ``max_factor`` buckets, else two
    even factors (a power of two near sqrt(n) times the rest), so the rotation needs only about
    sqrt(n) columns. ``n_buckets`` must be 1 or even."""
    if n_buckets <= max_factor:
        return (n_buckets,)
    first = 2 ** math.ceil(math.log2(math.sqrt(n_buckets)))
    return (first, 2 * (n_buckets // (2 * first)))


def rotation_columns(factors: tuple[int, ...]) -> int:
    """Columns of the random rotation that :func:`angular_buckets` uses for ``factors``."""
    return sum(f // 2 for f in factors)


def angular_buckets(x: torch.Tensor, rotations: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """Angular LSH ``h(x) = argmax([xR; -xR])`` (Andoni et al. 2015, as in Reformer), per round.

    Args:
        x: (..., N, d) vectors.
        rotations: (..., R, d, P) random Gaussian matrices broadcastable against ``x``'s leading dims,
            P >= ``rotation_columns(factors)``.
        factors: from :func:`factor_buckets`; several factors hash hierarchically
            (bucket = b1 + f1 * b2). A single factor 1 puts everything in bucket 0.

    Returns:
        (..., R, N) int64 bucket ids in ``[0, prod(factors))``.
    """
    cols = rotation_columns(factors)
    shape = (*torch.broadcast_shapes(x.shape[:-2], rotations.shape[:-3]), rotations.shape[-3], x.shape[-2])
    if cols == 0:
        return torch.zeros(shape, dtype=torch.long, device=x.device)
    # A broadcast matmul, not einsum: onnxruntime's Einsum rejects ellipses of different ranks.
    rotated = x.unsqueeze(-3) @ rotations[..., :cols].to(x.dtype)
    buckets, start, scale = None, 0, 1
    for f in factors:
        part = rotated[..., start : start + f // 2]
        start += f // 2
        # argmax([p; -p]) without building [p; -p]: the larger of max(p) and -min(p) (ties: first half).
        top, arg_top = part.max(dim=-1)
        low, arg_low = part.min(dim=-1)
        b = torch.where(top >= -low, arg_top, arg_low + f // 2)
        buckets = b if buckets is None else buckets + scale * b
        scale *= f
    return buckets


def e2lsh_project(
    x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, width: float = 1.0
) -> torch.Tensor:
    """E2LSH value ``(a·x + b) / r`` before its floor (Datar et al. 2004), per round.

    Sorting these values and cutting the sorted order into equal clusters is SMYRF's balanced LSH
    clustering (the authors' code sorts the unfloored value; the floor is monotone and only adds ties).

    Args:
        x: (..., N, D); alpha: (..., D, R) Gaussian; beta: (..., 1, R) uniform in [0, r); width: r.

    Returns:
        (..., R, N).
    """
    return ((x @ alpha.to(x.dtype) + beta.to(x.dtype)) / width).transpose(-1, -2)


def xbox_plus(
    q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SMYRF's asymmetric XBOX+ transform, (..., N, d) -> (..., N, d + 2) each.

    F(q) = [q, 0, sqrt(M_Q² - |q|²)], G(k) = [k, sqrt(M_K² - |k|²), 0], with M_Q, M_K the largest
    query/key norms of the row, so |F(q) - G(k)|² = M_Q² + M_K² - 2 q·k: the nearest key in Euclidean
    distance is the one of largest inner product. ``valid`` (N,) bool excludes padded tokens from the
    maxima.
    """
    qn, kn = q.square().sum(-1, keepdim=True), k.square().sum(-1, keepdim=True)
    if valid is not None:
        keep = valid.unsqueeze(-1)
        mq = qn.masked_fill(~keep, 0).amax(dim=-2, keepdim=True)
        mk = kn.masked_fill(~keep, 0).amax(dim=-2, keepdim=True)
    else:
        mq, mk = qn.amax(dim=-2, keepdim=True), kn.amax(dim=-2, keepdim=True)
    ext_q, ext_k = (mq - qn).clamp_min(0).sqrt(), (mk - kn).clamp_min(0).sqrt()
    zero = torch.zeros_like(ext_q)
    return torch.cat([q, zero, ext_q], dim=-1), torch.cat([k, ext_k, zero], dim=-1)


def stable_argsort(keys: torch.Tensor) -> torch.Tensor:
    """``argsort(keys, stable=True)`` along the last dim, also when exported to ONNX.

    ONNX has no stable sort (``aten.sort.stable`` does not convert), so under ``torch.export`` the same
    permutation comes from a plain sort of unique int64 keys ``key * N + position``; float keys are
    first replaced by their dense rank (a plain sort, then the index of each run of equal values).
    Eager keeps the one stable sort, which is faster.
    """
    if not is_exporting():
        return keys.argsort(dim=-1, stable=True)
    n = keys.shape[-1]
    if keys.is_floating_point():
        first = keys.argsort(dim=-1)  # ties in any order: only the runs of equal values are used
        ordered = keys.gather(-1, first)
        starts = torch.cat(
            [torch.ones_like(ordered[..., :1], dtype=torch.bool), ordered[..., 1:] != ordered[..., :-1]], -1
        )
        keys = torch.zeros_like(first).scatter(-1, first, starts.long().cumsum(-1))
    return (keys.long() * n + torch.arange(n, device=keys.device)).argsort(dim=-1)


def sort_with_inverse(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``perm = argsort(keys)`` along the last dim (stable: ties, e.g. identical tokens of a flat image
    region, keep raster order, so eval stays deterministic) and its inverse (``inv[perm[i]] = i``)."""
    perm = stable_argsort(keys)
    ticker = torch.arange(keys.shape[-1], device=keys.device).expand_as(perm)
    inv = torch.empty_like(perm).scatter_(-1, perm, ticker)
    return perm, inv


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (..., N, d) picked by ``index`` (..., *S) with the same leading dims -> (..., *S, d).

    With ``index = perm`` (..., R, N) this sorts the tokens of every round; applied to sorted rows
    (..., R, N, d) with the inverse permutation (..., R, N) it scatters them back. A flat
    ``index_select``: its backward is an ``index_add`` into x's shape, where a broadcast gather would
    allocate a zero gradient the size of the broadcast input.
    """
    lead, (n, d) = x.shape[:-2], x.shape[-2:]
    rows = math.prod(lead)
    offsets = torch.arange(rows, device=x.device) * n
    offsets = offsets.view(*lead, *([1] * (index.dim() - len(lead))))
    picked = x.reshape(rows * n, d).index_select(0, (index + offsets).reshape(-1))
    return picked.view(*index.shape, d)


def look_back(x: torch.Tensor, chunk_dim: int, back: int) -> torch.Tensor:
    """Each chunk along ``chunk_dim`` followed by its ``back`` predecessors (circularly) along
    ``chunk_dim + 1``; callers mask wrapped chunks (for sorted tokens: later in the sort, other buckets)."""
    chunk_dim = chunk_dim % x.dim()
    if back == 0:
        return x
    if torch.compiler.is_compiling() and not is_exporting():
        # Inductor turns the index_select below into scalar indirect loads and its backward into a scalar
        # scatter-add; rolls and a concatenation are plain strided copies (and adds) that it vectorises.
        return torch.cat([x.roll(k, chunk_dim) for k in range(back + 1)], dim=chunk_dim + 1)
    lead, nc, tail = x.shape[:chunk_dim], x.shape[chunk_dim], x.shape[chunk_dim + 1 :]
    chunk = torch.arange(nc, device=x.device)
    # One index_select of whole chunks as rows (chunk c's window: rows c, c-1, ... of its group): a
    # single copy and a row-wise backward, where rolls and a concatenation copy the windows repeatedly.
    order = torch.stack([(chunk + nc - k) % nc for k in range(back + 1)], dim=1).flatten()
    rows = (torch.arange(math.prod(lead), device=x.device).unsqueeze(-1) * nc + order).flatten()
    windows = x.reshape(math.prod(lead) * nc, -1).index_select(0, rows)
    return windows.view(*lead, nc, (back + 1) * tail[0], *tail[1:])


def look_one_back(x: torch.Tensor, chunk_dim: int) -> torch.Tensor:
    """Chunks along ``chunk_dim`` -> each chunk concatenated with the previous one (circularly) along
    ``chunk_dim + 1``. A single chunk is returned unchanged (it would see itself twice)."""
    return look_back(x, chunk_dim, min(1, x.shape[chunk_dim] - 1))


class _AttendLSE(torch.autograd.Function):
    """softmax(dots) @ v and logsumexp(dots); saves the probabilities, v and the output for backward."""

    @staticmethod
    def forward(ctx, dots: torch.Tensor, v: torch.Tensor):
        p = torch.softmax(dots, dim=-1)
        # lse = max - log(max p): two reductions instead of logsumexp's extra elementwise passes.
        lse = dots.amax(dim=-1) - p.amax(dim=-1).log()
        out = p.to(v.dtype) @ v
        ctx.save_for_backward(p, v, out)
        return out, lse

    @staticmethod
    def backward(ctx, g_out: torch.Tensor, g_lse: torch.Tensor):
        p, v, out = ctx.saved_tensors
        g_out = g_out.to(v.dtype)
        dp = (g_out @ v.transpose(-1, -2)).to(p.dtype)
        # sum_j p_j dp_j = g_out · out (FlashAttention's trick); d lse / d dots = p.
        shift = (g_out * out).sum(-1).to(p.dtype) - g_lse.to(p.dtype)
        g_dots = dp.sub_(shift.unsqueeze(-1)).mul_(p)
        return g_dots, p.transpose(-1, -2).to(v.dtype) @ g_out


def attend_lse(dots: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention on explicit logits: ``(softmax(dots) @ v, logsumexp(dots))``.

    ``dots`` (..., M, K) may hold -inf for excluded keys (every row needs one finite entry); v
    (..., K, d). Used where rounds must be merged, which needs the normaliser with its gradient.
    """
    return _AttendLSE.apply(dots, v)


def merge_rounds(out: torch.Tensor, lse: torch.Tensor, dim: int) -> torch.Tensor:
    """Combine per-round attention outputs ``out`` (..., R, ..., d) with their log-normalisers ``lse``
    (same shape without d) along round ``dim``: weights softmax_r(lse_r), i.e. one softmax over the
    union (with multiplicity) of the keys seen in every round."""
    out_dim = dim if dim >= 0 else dim - 1
    # At least float32, never below the input's precision (float64 rounded to float32 here made the
    # merged output's gradient wrong at the 1e-7 level).
    weights = torch.softmax(upcast_for_accuracy(lse), dim=dim)
    weights = weights.to(out.dtype).unsqueeze(-1)
    return (out * weights).sum(dim=out_dim)
