"""Online spherical k-means with EMA centroids and balanced top-w cluster membership.

Used by the Routing Transformer (and available to any clustering block). Conventions: tokens are rows of
``(B, h, N, d)`` tensors, centroids ``(h, k, d)`` per head; ``x`` is unit-normalised before it is
compared with the (unit) centroids, so nearest centroid = largest cosine.

* :func:`centroid_scores` — cosine of every token with every centroid, ``(B, h, k, N)``.
* :func:`topw_members` — each centroid takes its ``w`` best tokens (balanced: every cluster has exactly w
  members; a token may be in several clusters or in none), sorted by raster position.
* :func:`scatter_mean` — per-cluster outputs back to token order, averaged over the clusters that took
  a token (zero for a token no cluster took).
* :func:`ema_update_` — the k-means step as an exponential moving average of the members' mean,
  all-reduced across processes when ``torch.distributed`` is initialised, so DDP replicas keep identical
  centroids.
* :func:`commitment_loss` — mean ``|x - mu(x)|²`` over tokens (gradient to x only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import accuracy_dtype

__all__ = ["centroid_scores", "topw_members", "scatter_mean", "ema_update_", "commitment_loss"]


def centroid_scores(x_unit: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) unit tokens, (h, k, d) centroids -> (B, h, k, N) cosines."""
    return torch.einsum("bhnd,hkd->bhkn", x_unit, means.to(x_unit.dtype))


def topw_members(scores: torch.Tensor, w: int) -> torch.Tensor:
    """Indices (B, h, k, w) of the ``w`` tokens nearest to each centroid, ascending in position.

    Sorting by position makes a cluster's causal mask lower-triangular when queries and keys are the
    same tokens (shared QK). Ties at the w-th score (identical tokens, e.g. a constant image region)
    go to the lowest positions: ``topk`` alone breaks them by implementation (torch and onnxruntime
    differ), so only its w-th value is used and the members are then picked by unique integer keys.
    """
    n = scores.shape[-1]
    kth = scores.topk(w, dim=-1).values[..., -1:]
    above = scores > kth
    tied = scores == kth
    take = above | (tied & (tied.cumsum(-1) <= w - above.sum(-1, keepdim=True)))
    # Unique keys, members' above the others', each group descending with position: the top-w keys are
    # the w members in position order (non-members only fill in when NaN scores leave fewer than w).
    rev = n - torch.arange(n, device=scores.device)
    key = torch.where(take, rev + n, rev)
    top = key.topk(w, dim=-1).values
    return torch.where(top > n, 2 * n - top, n - top)


def scatter_mean(out: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Per-cluster rows ``out`` (B, h, k, w, d) taken from positions ``index`` (B, h, k, w) -> (B, h, n, d),
    each token the mean of its rows over the clusters that took it (zero if none did)."""
    b, h, k, w, d = out.shape
    flat = index.reshape(b, h, k * w)
    total = out.new_zeros(b, h, n, d).index_put_(
        (
            torch.arange(b, device=out.device).view(b, 1, 1),
            torch.arange(h, device=out.device).view(1, h, 1),
            flat,
        ),
        out.reshape(b, h, k * w, d),
        accumulate=True,
    )
    count = torch.zeros(b, h, n, device=out.device, dtype=out.dtype).scatter_add_(
        -1, flat, torch.ones_like(flat, dtype=out.dtype)
    )
    return total / count.clamp_min(1).unsqueeze(-1)


@torch.no_grad()
def ema_update_(means: torch.Tensor, x_unit: torch.Tensor, assign: torch.Tensor, decay: float) -> None:
    """One online k-means step in place, ``mu_c <- normalize(decay * mu_c + (1 - decay) * mean{x: c(x) = c})``
    for every centroid that received tokens (the others keep their value).

    Args:
        means: (h, k, d) centroid buffer, updated in place.
        x_unit: (B, h, N, d) unit tokens; assign: (B, h, N) nearest-centroid ids.
    """
    h, k, d = means.shape
    # Sums of many tokens and the EMA's small steps are noise in half types; float64 centroids keep
    # float64 (the buffer's precision decides, as the result is written back into it).
    acc = accuracy_dtype(means.dtype)
    x = x_unit.detach().to(acc).transpose(0, 1).reshape(h, -1, d)
    ids = assign.transpose(0, 1).reshape(h, -1)
    sums = torch.zeros(h, k, d, device=means.device, dtype=acc).scatter_add_(
        1, ids.unsqueeze(-1).expand(-1, -1, d), x
    )
    counts = torch.zeros(h, k, device=means.device, dtype=acc).scatter_add_(
        1, ids, torch.ones_like(ids, dtype=acc)
    )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every replica must move its centroids identically, or their routing diverges.
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(counts)
    seen = counts > 0
    new = sums / counts.clamp_min(1).unsqueeze(-1)
    moved = F.normalize(decay * means.to(acc) + (1.0 - decay) * new, dim=-1)
    means.copy_(torch.where(seen.unsqueeze(-1), moved, means.to(acc)).to(means.dtype))


def commitment_loss(x_unit: torch.Tensor, means: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``|x - mu_{c(x)}|²`` (centroids are constants: a buffer)."""
    h, k, d = means.shape
    mu = means.to(x_unit.dtype).unsqueeze(0).expand(x_unit.shape[0], -1, -1, -1)
    routed = mu.gather(2, assign.unsqueeze(-1).expand(-1, -1, -1, d))
    return (x_unit - routed).square().sum(-1).mean()
