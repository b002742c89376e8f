"""Large Memory Layers with Product Keys — https://arxiv.org/abs/1907.05242

Token-wise: every pixel of the (B, C, H, W) map is one query of the memory (the layer replaces an FFN,
it mixes no positions), so it needs no padding and is causal by construction; the output is the
residual ``x + proj(memory(x))`` of every pixel.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..layers import AttnBlock, accuracy_dtype, factory_kwargs, to_map, to_tokens, upcast_for_accuracy
from ..registry import register_attn


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"pkm: {what} must be a positive int, got {value!r}")
    return value


VALUE_READS = ("auto", "bag", "gather")
# Floating dtypes whose EmbeddingBag forward AND per-sample-weights backward have CUDA kernels; bf16 has
# none for that backward ("_embedding_bag_per_sample_weights_backward_cuda" not implemented for 'BFloat16').
_CUDA_BAG_DTYPES = (torch.float16, torch.float32, torch.float64)
# Tokens per chunk of the gather path are chosen so that one chunk's gathered rows (tokens x slots x C)
# stay under this many elements (128 MiB in bf16; the backward's fp32 products 256 MiB): all M·k·C rows
# at once would be 2 GiB in bf16 at B=2, C=256, 128x128, heads·topk = 128. Larger chunks mean fewer
# kernel launches (16 chunks at that size), smaller ones a lower peak.
_GATHER_CHUNK_ELEMENTS = 1 << 26


def _value_read_backend(device, dtype: torch.dtype, setting: str = "auto") -> str:
    """The one place that picks how pkm reads its value table: ``"bag"`` (EmbeddingBag) or ``"gather"``.

    ``setting`` is the block's ``value_read``: ``"bag"`` or ``"gather"`` force that path, ``"auto"``
    keeps EmbeddingBag wherever it has every kernel pkm needs (any dtype on CPU; fp16, fp32 and fp64 on
    CUDA) and takes the gather path everywhere else (bf16 on CUDA, other device types). The choice does
    not depend on grad mode, although only the backward lacks a bf16 CUDA kernel, so that training and
    evaluation read the memory with the same arithmetic.
    """
    if setting not in VALUE_READS:
        raise ValueError(f"pkm: value_read must be one of {', '.join(VALUE_READS)}, got {setting!r}")
    if setting != "auto":
        return setting
    kind = torch.device(device).type
    if kind == "cpu" or (kind == "cuda" and dtype in _CUDA_BAG_DTYPES):
        return "bag"
    return "gather"


class _GatherWeightedSum(torch.autograd.Function):
    """``out[m] = sum_j w[m, j] · table[slots[m, j]]``: EmbeddingBag(mode="sum") with per-sample weights,
    built from gathers and batched matmuls, which have kernels for every dtype and device.

    Besides the table (a parameter), only ``slots`` and ``w`` are saved, as EmbeddingBag saves: the
    gathered rows are rebuilt chunk by chunk in backward instead of being kept (plain autograd through
    the gather would keep all M·k·C of them), so the activation memory matches EmbeddingBag's. The
    table's gradient is summed in at least float32 (a slot read by many tokens would lose its small
    contributions in a bf16 sum) and, with ``sparse=True``, returned as a sparse COO tensor as
    ``nn.Embedding`` does.
    """

    @staticmethod
    def forward(ctx, table, slots, w, sparse: bool):
        ctx.save_for_backward(table, slots, w)
        ctx.sparse = sparse
        out = table.new_empty(slots.shape[0], table.shape[1])
        for lo, hi in _chunks(slots.shape[0], slots.shape[1] * table.shape[1]):
            out[lo:hi] = torch.bmm(w[lo:hi, None, :], F.embedding(slots[lo:hi], table)).squeeze(1)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        table, slots, w = ctx.saved_tensors
        m, k = slots.shape
        grad_w = grad_table = None
        if ctx.needs_input_grad[2]:
            grad_w = w.new_empty(m, k)
            for lo, hi in _chunks(m, k * table.shape[1]):
                rows = F.embedding(slots[lo:hi], table)
                grad_w[lo:hi] = torch.bmm(rows, grad_out[lo:hi, :, None]).squeeze(-1)
        if ctx.needs_input_grad[0]:
            if ctx.sparse:
                rows = (w[:, :, None] * grad_out[:, None, :]).reshape(m * k, -1).to(table.dtype)
                # Indices come from top-k over the table's own slots, so they are in range by construction.
                grad_table = torch.sparse_coo_tensor(
                    slots.reshape(1, -1), rows, table.shape, check_invariants=False
                )
            else:
                acc_dtype = accuracy_dtype(table.dtype)
                acc = torch.zeros(table.shape, dtype=acc_dtype, device=table.device)
                for lo, hi in _chunks(m, k * table.shape[1]):
                    rows = w[lo:hi, :, None].to(acc_dtype) * grad_out[lo:hi, None, :].to(acc_dtype)
                    acc.index_add_(0, slots[lo:hi].reshape(-1), rows.reshape(-1, table.shape[1]))
                grad_table = acc.to(table.dtype)
        return grad_table, None, grad_w, None


def _chunks(m: int, per_token: int):
    """(lo, hi) token ranges covering ``range(m)``, each at most ``_GATHER_CHUNK_ELEMENTS // per_token``."""
    step = max(1, _GATHER_CHUNK_ELEMENTS // max(1, per_token))
    return [(lo, min(lo + step, m)) for lo in range(0, m, step)]


@register_attn(
    "pkm",
    title="Large Memory Layers with Product Keys",
    arxiv="1907.05242",
    year=2019,
    family="memory",
    complexity="O(N·(sqrt(|K|)·d_k + k²·h + k·h·C))",
    flops_exponent=1.0,
    native_2d=False,
    causal=True,
    token_mixing=False,
    identity_init=True,
    idea="per-pixel query picks top-k of |C|² product keys via two |C|-key halves; softmax-weighted value sum",
    reference="https://github.com/facebookresearch/XLM",
)
class ProductKeyMemory(AttnBlock):
    """Product-key memory layer, ``x + proj(sum_h sum_i w_hi · V[idx_hi])`` per pixel, ``proj`` zero-initialised.

    Per head h the query ``q = LN(W_q x)`` (dimension ``k_dim``) is split into halves q1, q2; each half
    is scored against its own table of ``n_keys`` sub-keys, the top ``topk`` of each half are kept, and
    the top ``topk`` of the topk x topk sums are exactly the top ``topk`` of all n_keys² product keys
    (the paper's Eq. 4 argument). The weights are the softmax of those scores and the ``n_keys²``-row
    value table, shared by the heads, is read by ``EmbeddingBag`` (sum of the weighted rows of every
    head), or, where EmbeddingBag lacks a kernel (bf16 training on CUDA), by gathers and a batched matmul
    (``value_read``).

    Departures from the paper, and why: queries are normalised by LayerNorm (per pixel) instead of
    BatchNorm, because BatchNorm's training statistics mix every position and sample into each pixel's
    query (a leak of the future and of the batch); ``n_keys`` defaults to ``min(512, C)`` (the paper's 512
    with d_model = 1024 would put 262144·C value parameters into a C = 16 block) and ``k_dim`` to
    ``min(512, C)`` (the paper: 512 = d_model / 2). The value table gets dense gradients; the paper's
    sparse updates need ``sparse_values=True`` and a sparse optimiser (with its own, larger learning rate).

    Args:
        channels: input channels C (value dimension).
        heads: memory heads sharing the value table (paper: 4).
        n_keys: sub-keys per half (|C|; paper 512); the memory has n_keys² slots. Default ``min(512, C)``.
        topk: keys selected per half and slots read per head (paper: 32).
        k_dim: query / product-key dimension per head, even (paper: 512). Default ``min(512, C)``
            rounded up to an even number.
        sparse_values: sparse gradients for the value table (paper's sparse update).
        value_read: how the value table is read: ``"auto"`` (default: EmbeddingBag where it has every
            kernel, i.e. CPU and CUDA fp16/fp32/fp64; the gather path elsewhere, e.g. CUDA bf16, whose
            EmbeddingBag backward has no kernel), ``"bag"`` or ``"gather"`` to force one. Both compute the
            same sum; the gather path gathers the top-k rows and sums them by a batched matmul.
        causal: accepted for the causal-block API; a token-wise layer is always causal.

    Causality: no pixel's output depends on any other pixel (AttnInfo ``token_mixing=False``), so the
    block is causal by construction; ``causal`` is accepted for a uniform API and changes nothing.
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int = 4,
        n_keys: int | None = None,
        topk: int = 32,
        k_dim: int | None = None,
        sparse_values: bool = False,
        value_read: str = "auto",
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        self.causal = causal
        # An unknown setting fails at construction, not at the first forward.
        _value_read_backend("cpu", torch.float32, value_read)
        self.value_read = value_read
        dd = factory_kwargs(device, dtype)
        self.heads = _positive_int(heads, "heads")
        self.n_keys = _positive_int(min(512, channels) if n_keys is None else n_keys, "n_keys")
        self.topk = _positive_int(topk, "topk")
        k_dim = min(512, channels + channels % 2) if k_dim is None else k_dim
        self.k_dim = _positive_int(k_dim, "k_dim")
        if self.k_dim % 2:
            raise ValueError(f"pkm: k_dim must be even (it is split into two halves), got {k_dim!r}")
        half = self.k_dim // 2
        self.query = nn.Linear(channels, self.heads * self.k_dim, **dd)
        self.query_norm = nn.LayerNorm(self.k_dim, **dd)
        # (heads, 2 halves, n_keys, half): the paper's uniform init in ±1/sqrt(half).
        bound = 1.0 / math.sqrt(half)
        self.keys = nn.Parameter(torch.empty(self.heads, 2, self.n_keys, half, **dd).uniform_(-bound, bound))
        self.values = nn.EmbeddingBag(self.n_keys**2, channels, mode="sum", sparse=sparse_values, **dd)
        nn.init.normal_(self.values.weight, std=channels**-0.5)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def lookup(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and slot indices, each (M, heads, topk), of the top-k product keys of M tokens (M, C)."""
        q = self.query_norm(rearrange(self.query(tokens), "m (h d) -> m h d", h=self.heads))
        q = rearrange(q, "m h (s d) -> m h s d", s=2)
        sub = torch.einsum("mhsd,hskd->mhsk", q, self.keys.to(q.dtype))  # (M, h, 2, n_keys)
        k1 = min(self.topk, self.n_keys)
        s, i = sub.topk(k1, dim=-1)  # (M, h, 2, k1)
        sums = s[:, :, 0, :, None] + s[:, :, 1, None, :]  # (M, h, k1, k1)
        slots = i[:, :, 0, :, None] * self.n_keys + i[:, :, 1, None, :]
        scores, best = sums.flatten(2).topk(min(self.topk, k1 * k1), dim=-1)
        return scores, slots.flatten(2).gather(-1, best)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = to_tokens(x)
        b, n, c = tokens.shape
        scores, slots = self.lookup(tokens.reshape(b * n, c))
        weight = self.values.weight
        # Softmax in at least float32; float64 stays float64 (a float32 softmax made its gradient noise).
        w = F.softmax(upcast_for_accuracy(scores), dim=-1).to(weight.dtype)
        slots, w = slots.reshape(b * n, -1), w.reshape(b * n, -1)
        if _value_read_backend(weight.device, weight.dtype, self.value_read) == "bag":
            mem = self.values(slots, per_sample_weights=w)
        else:
            mem = _GatherWeightedSum.apply(weight, slots, w, self.values.sparse)
        out = self.proj(mem)
        return x + to_map(out.reshape(b, n, c), height, width).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, heads={self.heads}, n_keys={self.n_keys}, topk={self.topk}, "
            f"k_dim={self.k_dim}" + ("" if self.value_read == "auto" else f", value_read={self.value_read!r}")
        )
