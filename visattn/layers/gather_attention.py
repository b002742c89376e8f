"""Softmax attention of each query over its own gathered key set (content-chosen sparse attention).

Shared by blocks whose keys per query are chosen by content or a learned predictor (scram, sac).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .hashing import gather_tokens

__all__ = ["gather_attend"]


def gather_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of every query over its own key set: q, k, v (B, h, N, d), index (B, h, N, m)
    distinct key ids per query -> (B, h, N, d). Keys are gathered (O(N·m·d)); never an N x N matrix.

    ``mask`` (broadcastable to (B, h, N, m), True = attend; every query needs one True) drops entries;
    ``value_scale`` (same broadcast) multiplies each gathered value row (after the softmax, per edge).
    """
    b, h, n, d = q.shape
    m = index.shape[-1]
    kg = gather_tokens(k, index)
    vg = gather_tokens(v, index)
    if value_scale is not None:
        vg = vg * value_scale.unsqueeze(-1).to(vg.dtype)
    if mask is not None:
        mask = mask.expand(b, h, n, m).reshape(b * h, n, 1, m)
    # Queries as SDPA's "heads" axis with one row each: one fused softmax per query over its m keys.
    out = F.scaled_dot_product_attention(
        q.reshape(b * h, n, 1, d), kg.reshape(b * h, n, m, d), vg.reshape(b * h, n, m, d), attn_mask=mask
    )
    return out.view(b, h, n, d)
