"""GMAT: Global Memory Augmentation for Transformers — https://arxiv.org/abs/2006.03274

2D adaptation: the sparse part is a k x k sliding window around every pixel (out-of-map keys excluded), and
M learned memory tokens are prepended: the memory attends densely to itself and to every pixel ("write"),
every pixel attends to its window and to all memory tokens ("read"), with the same projections (GMAT adds
memory tokens to an unchanged layer). GMAT updates all tokens at once per layer and carries the memory to the
next layer; a single block cannot return the memory, so it writes first and the pixels read the written
memory (the memory half of two consecutive layers), or the memory would stay a constant.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import (
    AttnBlock,
    check_odd_kernel,
    factory_kwargs,
    multihead_sdpa,
    resolve_heads,
    to_tokens,
)
from ..layers.sparse_pattern import (
    Grid,
    Pattern,
    PatternAttention,
    ceil_div,
    crop_to_map,
    pad_to_grid,
    window_segment,
    window_tile,
    with_shared_keys,
)
from ..registry import register_attn


@register_attn(
    "gmat",
    title="GMAT: Global Memory Augmentation for Transformers",
    arxiv="2006.03274",
    year=2020,
    family="sparse",
    complexity="O(N·(k² + M)·D + M²·D)",
    flops_exponent=1.0,
    native_2d=False,
    causal=False,
    identity_init=True,
    idea="M learned global memory tokens read and written densely + a k x k local window for the pixels",
    reference="https://github.com/ag1988/gmat",
)
class GMAT(AttnBlock):
    """Local window + dense global memory, ``x + proj(attn(x))`` with a zero-initialised projection.

    Args:
        channels: input channels C.
        num_memory: memory tokens M (M << N; 64 here, not a value checked against the paper); 0 = the window
            alone.
        kernel_size: local window k (odd; 15, the 2D window of longformer / Vision Longformer).
        heads: attention heads (default: ``default_heads(C)``).
        qkv_bias: bias in the q/k/v projections.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_memory: int = 64,
        kernel_size: int = 15,
        heads: int | None = None,
        qkv_bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        if num_memory < 0:
            raise ValueError(f"gmat: num_memory must be >= 0, got {num_memory}")
        check_odd_kernel(kernel_size, "gmat")
        heads = resolve_heads(channels, heads, "gmat")
        dd = factory_kwargs(device, dtype)
        self.num_memory, self.kernel_size, self.heads = num_memory, kernel_size, heads
        self.attn = PatternAttention(channels, heads, qkv_bias=qkv_bias, **dd)
        if num_memory:
            self.memory = nn.Parameter(torch.randn(num_memory, channels, **dd) * 0.02)

    def pattern(self, height: int, width: int, device=None) -> Pattern:
        """Window + the memory as extra keys, on the grid padded to the window tiles."""
        tile = window_tile(self.kernel_size, height, width)
        grid = Grid(ceil_div(height, tile[0]) * tile[0], ceil_div(width, tile[1]) * tile[1], height, width)
        seg = window_segment(grid, self.kernel_size, tile=tile, device=device)
        if self.num_memory:
            seg = with_shared_keys(seg, torch.arange(grid.n, grid.n + self.num_memory, device=device))
        return Pattern(grid, (seg,), extra=self.num_memory)

    def write_memory(self, x: torch.Tensor) -> torch.Tensor:
        """The memory after attending densely to itself and to every pixel: (B, M, C)."""
        b = x.shape[0]
        # Project the (batch-shared) memory once, then expand: the same as projecting every copy.
        kv = torch.cat([self.attn.kv(self.memory).expand(b, -1, -1), self.attn.kv(to_tokens(x))], dim=1)
        k, v = kv.chunk(2, dim=-1)
        q = self.attn.q(self.memory).expand(b, -1, -1)
        return self.memory + self.attn.proj(multihead_sdpa(q, k, v, self.heads))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        pattern = self.pattern(*x.shape[-2:], device=x.device)
        memory = self.write_memory(x) if self.num_memory else None
        xp = pad_to_grid(x, pattern.grid.rows, pattern.grid.cols)
        # Compiled (inductor, CPU) this block is no faster than eager (~1.0x at 64x64): the tiled SDPA, about
        # 2/3 of the step, is the same kernel either way, and inductor inlines the engine's (T, K) key
        # validity gather ``valid[keys]`` (sparse_pattern.segment_masks) into both (T, Q, K) loops over the
        # tile mask (the empty-row ``any`` and the additive float mask) as a bounds-checked scalar load per
        # element, ~20% of the compiled step. Making that mask one opaque op in the engine gives ~0.9x.
        out = self.attn(to_tokens(xp), pattern, memory)
        return x + crop_to_map(out, pattern.grid, *x.shape[-2:])

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_memory={self.num_memory}, kernel_size={self.kernel_size}"
