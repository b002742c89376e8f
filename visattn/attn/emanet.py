"""EMANet: Expectation-Maximization Attention Networks for Semantic Segmentation — https://arxiv.org/abs/1907.13426

Native 2D: the H·W pixels of one map are the data of a K-component mixture; T EM steps (E: softmax over
the bases of xᵀμ; M: μ = X·Z normalised over pixels, then L2 over channels) compress the map into K bases,
and every pixel is rebuilt as μ zᵀ. The initial bases are a buffer, moving-averaged in training only.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct

from ..layers import AttnBlock, factory_kwargs
from ..registry import register_attn

__all__ = ["EMAModule", "EMANet"]


class EMAModule(nn.Module):
    """The EM attention of EMANet on a (B, C, H, W) map, with its bases buffer.

    Shares its layout with mmsegmentation's ``EMAModule`` (``bases`` of shape (1, C, K)), so checkpoints
    load by name. Each sample runs its own EM from the shared initial bases, so eval outputs do not
    depend on the batch; only training moves the buffer.

    Args:
        channels: channels C of the map.
        num_bases: number of bases K (paper: 64).
        num_stages: EM iterations T (paper: 3).
        momentum: weight of the new batch bases in the moving average (paper's α = 0.9 is 1 - momentum).
    """

    def __init__(
        self, channels: int, num_bases: int, num_stages: int, momentum: float, *, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.num_bases = num_bases
        self.num_stages = num_stages
        self.momentum = momentum
        # Kaiming-normal draw, then unit columns: the paper's initialisation of μ.
        bases = torch.randn(1, channels, num_bases, **factory_kwargs(device, dtype)) * math.sqrt(
            2.0 / num_bases
        )
        self.register_buffer("bases", F.normalize(bases, dim=1))

    @staticmethod
    def _m_step(feats: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        # Responsibilities normalised over pixels (L1): a weighted mean of pixels, back on the unit sphere.
        bases = torch.einsum("bcn,bnk->bck", feats, F.normalize(attention, p=1, dim=1))
        return F.normalize(bases, dim=1)

    def em(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the T EM steps on ``feats`` (B, C, N); returns the final bases (B, C, K) and the
        responsibilities (B, N, K) of the last E-step.

        The bases carry no gradient (as in the paper's code and mmsegmentation). Those run every step
        without gradient, so their input projection never learns (mmseg freezes it); here the last E-step
        is recorded: the same values, and a gradient to the pixels through the responsibilities.
        """
        bases = self.bases.expand(feats.shape[0], -1, -1)
        with torch.no_grad():
            for _ in range(self.num_stages - 1):
                attention = torch.einsum("bcn,bck->bnk", feats, bases).softmax(dim=-1)
                bases = self._m_step(feats, attention)
        attention = torch.einsum("bcn,bck->bnk", feats, bases).softmax(dim=-1)
        with torch.no_grad():
            bases = self._m_step(feats, attention.detach())
        return bases, attention

    @torch.no_grad()
    def _update_bases(self, bases: torch.Tensor) -> None:
        # The corrected update of the official repo (its issue #8 updated a wrong attribute): this module's
        # own buffer moves towards the batch-mean bases.
        mean = F.normalize(bases.mean(dim=0, keepdim=True).to(self.bases.dtype), dim=1)
        if dist.is_available() and dist.is_initialized():
            # Every replica must keep the same bases (mmseg's reduce_mean).
            mean = mean.clone()
            dist.all_reduce(mean.div_(dist.get_world_size()), op=dist.ReduceOp.SUM)
            mean = F.normalize(mean, dim=1)
        # Re-normalised so the first E-step's temperature stays fixed (a convex mix of unit vectors shrinks).
        self.bases.copy_(F.normalize((1.0 - self.momentum) * self.bases + self.momentum * mean, dim=1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feats.shape
        flat = feats.flatten(2)
        bases, attention = self.em(flat)
        recon = torch.einsum("bck,bnk->bcn", bases, attention)
        if self.training:
            self._update_bases(bases)
        return recon.reshape(b, c, h, w)

    def extra_repr(self) -> str:
        return f"num_bases={self.num_bases}, num_stages={self.num_stages}, momentum={self.momentum}"


@register_attn(
    "emanet",
    title="Expectation-Maximization Attention Networks for Semantic Segmentation",
    arxiv="1907.13426",
    year=2019,
    family="lowrank",
    complexity="O(N·K·D·T)",
    flops_exponent=1.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="EM over K bases compresses the map; pixels are rebuilt from the bases by their responsibilities",
    reference="https://github.com/XiaLiPKU/EMANet",
    # EM bases are computed without gradient (the paper's and mmseg's stop-gradient): exact after the EMA unit.
    surrogate_gradient_exact=("ema_out_conv.",),
)
class EMANet(AttnBlock):
    """EMA unit: 1x1 conv, EM attention, ReLU, 1x1 conv + BN, plus the identity.

    ``x + BN(conv(relu(EMA(conv(x)))))`` with the BN scale zero-initialised, so the block is exactly the
    identity at initialisation. The official unit also applies a ReLU after the sum; it is left to the
    host network (it would break identity at initialisation).

    Submodule names follow mmsegmentation's ``EMAHead``: its ``ema_mid_conv``, ``ema_module.bases`` and
    ``ema_out_conv`` keys load here unchanged; the head keeps ``ema_in_conv`` and computes
    ``relu(block(ema_in_conv(x)))``.

    Args:
        channels: input channels C.
        num_bases: number of bases K (paper: 64).
        num_stages: EM iterations T (paper: 3).
        momentum: moving-average weight of the new bases in training (paper: 0.1, i.e. α = 0.9).
    """

    def __init__(
        self,
        channels: int,
        *,
        num_bases: int = 64,
        num_stages: int = 3,
        momentum: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if isinstance(num_bases, bool) or not isinstance(num_bases, int) or num_bases < 1:
            raise ValueError(f"emanet: num_bases must be a positive int, got {num_bases!r}")
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"emanet: num_stages must be a positive int, got {num_stages!r}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"emanet: momentum must be in [0, 1], got {momentum!r}")
        dd = factory_kwargs(device, dtype)
        # Projects the (often post-ReLU, non-negative) input to signed features for the EM.
        self.ema_mid_conv = ConvNormAct(
            channels, channels, 1, bias=True, apply_norm=False, apply_act=False, **dd
        )
        self.ema_module = EMAModule(channels, num_bases, num_stages, float(momentum), **dd)
        self.ema_out_conv = ConvNormAct(channels, channels, 1, bias=False, apply_act=False, **dd)
        for conv in (self.ema_mid_conv.conv, self.ema_out_conv.conv):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.ema_out_conv.bn.weight)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        recon = self.ema_module(self.ema_mid_conv(x))
        return x + self.ema_out_conv(F.relu(recon))
