"""Mixer cores as two steps of grouped ``scaled_dot_product_attention`` (axial, interlaced); the prefix
keys join the second step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from ..padding import ceil_div
from .base import MixerCore

__all__ = ["AxialCore", "InterlacedCore"]


def _keys_with_prefix(kt, vt, k, v, prefix, groups):
    """Append the prefix keys/values (B, h, P, d) to grouped keys (B*groups, h, L, d)."""
    if not prefix:
        return kt, vt
    kp = k[:, :, :prefix].repeat_interleave(groups, dim=0)
    vp = v[:, :, :prefix].repeat_interleave(groups, dim=0)
    return torch.cat([kt, kp], dim=2), torch.cat([vt, vp], dim=2)


class AxialCore(MixerCore):
    """Axial attention: attention along each row, then along each column over the row step's outputs
    (two hops reach every patch); the prefix keys join the column step."""

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        b = q.shape[0]
        qm, km, vm = (rearrange(t[:, :, prefix:], "b h (y x) d -> b h y x d", y=height) for t in (q, k, v))
        rows = F.scaled_dot_product_attention(
            *(rearrange(t, "b h y x d -> (b y) h x d") for t in (qm, km, vm))
        )
        rows = rearrange(rows, "(b y) h x d -> b h y x d", b=b)
        qc, kc, vc = (rearrange(t, "b h y x d -> (b x) h y d") for t in (qm, km, rows))
        kc, vc = _keys_with_prefix(kc, vc, k, v, prefix, width)
        out = F.scaled_dot_product_attention(qc, kc, vc)
        return rearrange(out, "(b x) h y d -> b h (y x) d", b=b)


class InterlacedCore(MixerCore):
    """ISA: attention among the patches at the same offset of every ``P_h x P_w`` block (long range), then
    among the patches of each block over those outputs (short range, with the prefix keys). The grid is
    padded centred as ISA does, but padded positions are masked as keys (they are not tokens). Dense limit:
    a block covering the grid (``down_factor >= (H, W)``)."""

    def __init__(self, dim: int, heads: int, *, down_factor: int | tuple[int, int] = (8, 8)) -> None:
        super().__init__(dim, heads)
        df = (down_factor, down_factor) if isinstance(down_factor, int) else tuple(down_factor)
        if len(df) != 2 or min(df) < 1:
            raise ValueError(
                f"isa (ViT mixer): down_factor must be an int or a pair >= 1, got {down_factor!r}"
            )
        self.down_factor = df

    def patches(self, q, k, v, grid, prefix):
        height, width = grid
        b = q.shape[0]
        ph, pw = min(self.down_factor[0], height), min(self.down_factor[1], width)
        hp, wp = ceil_div(height, ph) * ph, ceil_div(width, pw) * pw
        top, left = (hp - height) // 2, (wp - width) // 2
        pads = (0, 0, left, wp - width - left, top, hp - height - top)
        qm, km, vm = (
            F.pad(rearrange(t[:, :, prefix:], "b h (y x) d -> b h y x d", y=height), pads) for t in (q, k, v)
        )
        valid = F.pad(torch.ones(height, width, dtype=torch.bool, device=q.device), pads[2:], value=False)
        long_ = "b h (gy py) (gx px) d -> (b py px) h (gy gx) d"
        mask = rearrange(valid, "(gy py) (gx px) -> (py px) 1 1 (gy gx)", py=ph, px=pw).repeat(b, 1, 1, 1)
        out1 = F.scaled_dot_product_attention(
            *(rearrange(t, long_, py=ph, px=pw) for t in (qm, km, vm)), attn_mask=mask
        )
        out1 = rearrange(out1, "(b py px) h (gy gx) d -> b h (gy py) (gx px) d", b=b, py=ph, gy=hp // ph)
        short = "b h (gy py) (gx px) d -> (b gy gx) h (py px) d"
        groups = (hp // ph) * (wp // pw)
        qs, ks, vs = (rearrange(t, short, py=ph, px=pw) for t in (qm, km, out1))
        ks, vs = _keys_with_prefix(ks, vs, k, v, prefix, groups)
        mask = rearrange(valid, "(gy py) (gx px) -> (gy gx) 1 1 (py px)", py=ph, px=pw)
        mask = F.pad(mask, (0, prefix), value=True).repeat(b, 1, 1, 1)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
        out = rearrange(out, "(b gy gx) h (py px) d -> b h (gy py) (gx px) d", b=b, gy=hp // ph, py=ph)
        out = out[:, :, top : top + height, left : left + width]
        return rearrange(out, "b h y x d -> b h (y x) d")
