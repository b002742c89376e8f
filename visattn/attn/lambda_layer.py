"""LambdaNetworks: Modeling Long-Range Interactions Without Attention — https://arxiv.org/abs/2102.08602

Native 2D: a content lambda softmax_m(K)ᵀV summarises the whole map in a |k| x |v| matrix, and
position lambdas come from the paper's lambda convolution (an r x r convolution over V shared by
all value channels), so the layer takes any H, W; each pixel applies q_nᵀ(λ^c + λ^p_n) per head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import AttnBlock, factory_kwargs
from ..registry import register_attn


def _channels_last(embedding: torch.Tensor) -> torch.Tensor:
    """The embeddings with channels-last strides, also for |u| = 1, where ``.contiguous(memory_format=
    torch.channels_last)`` keeps the ambiguous contiguous strides and the convolution stays NCHW."""
    _, u, r, _ = embedding.shape
    return embedding.contiguous(memory_format=torch.channels_last).as_strided(
        embedding.shape, (u * r * r, 1, u * r, u)
    )


def _position_lambdas(v: torch.Tensor, embedding: torch.Tensor, batch: int) -> torch.Tensor:
    """The lambda convolution: (B·|v|, |u|, H, W) values -> (B, N, |v|, |k|) position lambdas.

    Every value channel is an image of |u| channels convolved (zero padding, no bias) with the |k|
    embeddings, as the paper's ``conv`` implementation does. Channels-last embeddings make the
    convolution write (B, |v|, N, |k|), so the per-pixel layout costs a copy of |k|-long runs
    instead of a full transpose (3x faster on CPU).
    """
    lam = F.conv2d(v, _channels_last(embedding), padding=embedding.shape[-1] // 2)
    return rearrange(lam, "(b v) k h w -> b (h w) v k", b=batch).contiguous()


def _position_output(q: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """y[b, h, v, n] = Σ_k q[b, h, k, n] λ^p[b, n, v, k], one small matrix product per pixel."""
    y = torch.matmul(rearrange(q, "b h k n -> b n h k"), lam.transpose(-1, -2))
    return rearrange(y, "b n h v -> b h v n")


class _PositionOutput(torch.autograd.Function):
    """The position output with a hand-written backward, optionally recomputing λ^p.

    λ^p is |k|·|v|/C times the size of the input (4x at the defaults); with ``recompute`` backward
    runs the lambda convolution again instead of keeping λ^p.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, v: torch.Tensor, embedding: torch.Tensor, recompute: bool):
        lam = _position_lambdas(v, embedding, q.shape[0])
        ctx.save_for_backward(q, v, embedding, None if recompute else lam)
        return _position_output(q, lam)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Work in the dtype forward produced (bf16 under autocast, which backward does not see).
        q, v, embedding, lam = (None if t is None else t.to(grad.dtype) for t in ctx.saved_tensors)
        need_q, need_v, need_e, _ = ctx.needs_input_grad
        grad_q = grad_v = grad_e = None
        grad = rearrange(grad, "b h v n -> b n v h")
        if need_q:
            lam = _position_lambdas(v, embedding, q.shape[0]) if lam is None else lam
            grad_q = rearrange(torch.matmul(grad.transpose(-1, -2), lam), "b n h k -> b h k n")
            # Contiguous for the queries' BatchNorm: its CPU backward goes wrong on this permuted
            # layout at B = 1 (tools/repro/cpu_batchnorm_backward_strided_grad.py).
            grad_q = grad_q.contiguous()
        if need_v or need_e:
            hh, r = v.shape[-2], embedding.shape[-1]
            grad_lam = torch.matmul(grad, rearrange(q, "b h k n -> b n h k"))  # (B, N, |v|, |k|)
            # oneDNN (torch 2.14, CPU) takes these 1-channel convolutions' gradients fastest
            # channels-last up to 13 x 13 kernels; past that its channels-last input gradient and
            # its NCHW weight gradient both slow down 2x, so large kernels go NCHW (a full transpose
            # of grad_lam, not |k|-long runs) and take the weight gradient as a forward convolution
            # with images and channels swapped: (|u|, B·|v|, H, W) ⋆ (|k|, B·|v|, H, W).
            large = v.device.type == "cpu" and r > 13
            layout = "b v k h w" if large else "b v h w k"
            grad_lam = rearrange(grad_lam, f"b (h w) v k -> {layout}", h=hh).contiguous()
            grad_lam = rearrange(grad_lam, f"{layout} -> (b v) k h w")
            weight = embedding if large else _channels_last(embedding)
            if need_v or (need_e and not large):
                grad_v, grad_e, _ = torch.ops.aten.convolution_backward(
                    grad_lam, v, weight, None, [1, 1], [r // 2] * 2, [1, 1], False, [0, 0], 1,
                    [need_v, need_e and not large, False],
                )  # fmt: skip
            if need_e and large:
                grad_e = F.conv2d(v.transpose(0, 1), grad_lam.transpose(0, 1), padding=r // 2).transpose(0, 1)
        return grad_q, grad_v, grad_e, None


@register_attn(
    "lambda",
    title="LambdaNetworks: Modeling Long-Range Interactions Without Attention",
    arxiv="2102.08602",
    year=2021,
    family="linear",
    complexity="O(N·|k|·|v|·(r²·|u| + h))",
    flops_exponent=1.0,
    native_2d=True,
    causal=False,
    identity_init=True,
    idea="content lambda softmax(K)ᵀV plus local position lambdas from an r x r lambda convolution, "
    "applied to multi-query heads",
    reference="https://github.com/lucidrains/lambda-networks",
)
class LambdaLayer(AttnBlock):
    """Multi-query lambda layer with a lambda convolution, residual: ``x + γ · λ(x)``, γ = 0 at init.

    Q = BN(W_Q x) with h heads of |k| channels, K = W_K x with |u| x |k| channels (softmax over the
    pixels), V = BN(W_V x) with |u| x |v| channels, |v| = C / h. The content lambda is
    λ^c = Σ_{u,m} softmax_m(K) Vᵀ, the position lambdas λ^p_n = Σ_{u,m in r x r around n} E_{n-m} Vᵀ_m
    (a bias-free convolution with zero padding, as in the paper's code), and y_n = q_nᵀ(λ^c + λ^p_n).

    Identity at initialisation: the paper's layer has no output projection (it replaces a 3x3
    convolution inside a ResNet bottleneck), so the block is made residual as ``x + γ·y`` with a
    scalar γ initialised to zero, rather than adding a zero-initialised projection the paper lacks.

    Args:
        channels: input channels C (= h·|v|).
        dim_k: query/key depth |k| (paper: 16).
        heads: query heads h; must divide C (paper: 4).
        dim_u: intra-depth |u| (paper: 1).
        r: lambda convolution scope, odd (paper: 23; timm's default 9 is a deviation).
        recompute: recompute the position lambdas in backward instead of saving them (not a paper
            setting): about 3x less saved activation at the defaults for one more lambda
            convolution in backward; worth it unless r is small.
    """

    def __init__(
        self,
        channels: int,
        *,
        dim_k: int = 16,
        heads: int = 4,
        dim_u: int = 1,
        r: int = 23,
        recompute: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if heads < 1 or channels % heads:
            raise ValueError(f"lambda: heads ({heads}) must be >= 1 and divide channels ({channels})")
        if dim_k < 1 or dim_u < 1:
            raise ValueError(f"lambda: dim_k and dim_u must be >= 1, got dim_k={dim_k}, dim_u={dim_u}")
        if r < 1 or r % 2 == 0:
            raise ValueError(f"lambda: r must be odd and >= 1, got {r}")
        dd = factory_kwargs(device, dtype)
        self.dim_k, self.heads, self.dim_u, self.r = dim_k, heads, dim_u, r
        self.recompute = bool(recompute)
        self.dim_v = channels // heads
        self.splits = (heads * dim_k, dim_k * dim_u, self.dim_v * dim_u)
        # One 1x1 conv for Q, K and V (one GEMM); BN on queries and values only, as in the paper.
        self.qkv = nn.Conv2d(channels, sum(self.splits), 1, bias=False, **dd)
        self.norm_q = nn.BatchNorm2d(self.splits[0], **dd)
        self.norm_v = nn.BatchNorm2d(self.splits[2], **dd)
        # Lambda-convolution embeddings E: (|k|, |u|, r, r), fan-in initialisation.
        self.embedding = nn.Parameter(torch.empty(dim_k, dim_u, r, r, **dd))
        self.gamma = nn.Parameter(torch.zeros(1, **dd))
        nn.init.normal_(self.qkv.weight, std=channels**-0.5)
        nn.init.normal_(self.embedding, std=(dim_u * r * r) ** -0.5)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = x.shape
        n = hh * ww
        q, k, v = self.qkv(x).split(self.splits, dim=1)
        q = self.norm_q(q).view(b, self.heads, self.dim_k, n)
        # Channel orders (k u) and (v u) make every reshape below a view.
        k = k.view(b, self.dim_k, self.dim_u, n).softmax(dim=-1)
        v = self.norm_v(v).contiguous()  # a channels_last input would make the (b v) view below fail

        # γ enters through the two lambdas, which are linear in it and small (|k| x |v| and the
        # embeddings): x + γ·y exactly, without keeping a (C, N) tensor for γ's gradient.
        # The content lambda is formed transposed, (|v|, |k|) = V softmax(K)ᵀ, so that V's gradient comes
        # back contiguous: from softmax(K) Vᵀ it would be a transposed view, and at B = 1 (batch stride
        # |v|) CPU BatchNorm backward computes a wrong gradient from it (torch 2.14; see
        # tools/repro/cpu_batchnorm_backward_strided_grad.py). Same products, same values in forward.
        content = torch.matmul(v.view(b, self.dim_v, -1), k.view(b, self.dim_k, -1).transpose(1, 2))
        y = torch.matmul((self.gamma * content).unsqueeze(1), q)  # (B, h, |v|, N)
        embedding = self.gamma * self.embedding
        v_maps = v.view(b * self.dim_v, self.dim_u, hh, ww)
        if torch.is_grad_enabled() and (q.requires_grad or v.requires_grad or embedding.requires_grad):
            y = y + _PositionOutput.apply(q, v_maps, embedding, self.recompute)
        else:
            y = y + _position_output(q, _position_lambdas(v_maps, embedding, b))
        return x + rearrange(y, "b h v (hh ww) -> b (h v) hh ww", hh=hh)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, dim_k={self.dim_k}, heads={self.heads}, dim_u={self.dim_u}, "
            f"r={self.r}, recompute={self.recompute}"
        )
