"""Input-independent Attention Weights Are Expressive Enough: A Study of Attention in Self-supervised Audio
Transformers — https://arxiv.org/abs/2006.05174

Sequence method on the flattened map (raster order): per head, softmax(R)·G(x) with learned logits R that
do not depend on the input, initialised with the paper's hand-crafted attention patterns (read in raster
order). R lives on a reference grid (``ref_size``) and is resampled to the input's H x W by 4-D bilinear
interpolation of its query and key grids (``visattn.layers.reference_grid``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import AttnBlock, factory_kwargs, merge_heads, split_heads, to_map, to_tokens
from ..layers.reference_grid import attend_with_weights, check_ref_size, resample_attention_map
from ..registry import register_attn

PATTERNS = ("self", "next", "previous", "past", "future", "last", "first")
_LOG_FLOOR = -10.0  # logit of "no attention" in a pattern: e^-10 per key, under 1% in total at ℓ = 256


def paper_patterns(n: int) -> torch.Tensor:
    """The seven hand-crafted attention patterns, (7, n, n) row-stochastic weights in :data:`PATTERNS` order.

    From the authors' code (Synthesizer/synthesizer_random.py of YNNEKUW/Miscellaneous-Self-Attention-
    Mechanisms-in-Transformers): attend to itself, to the next and to the previous position, to the past
    (keys j <= i-2) or the future (keys j >= i+2) with weight ∝ (j+1)³, and to every key with weight
    ∝ (j+1)³ (the last positions) or ∝ (n-j)³ (the first positions). Rows with no admissible key (next of
    the last position, past of the first two, ...) attend to themselves instead of wrapping around.
    """
    i = torch.arange(n).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    ramp_up = (j + 1.0) ** 3
    ramp_down = (n - j + 0.0) ** 3
    masks = [
        (j == i).double(),
        (j == i + 1).double(),
        (j == i - 1).double(),
        (j <= i - 2) * ramp_up,
        (j >= i + 2) * ramp_up,
        ramp_up.expand(n, n),
        ramp_down.expand(n, n),
    ]
    out = []
    for m in masks:
        m = m.double()
        empty = m.sum(-1, keepdim=True) == 0
        m = torch.where(empty, (j == i).double(), m)
        out.append(m / m.sum(-1, keepdim=True))
    return torch.stack(out)


def _default_heads(channels: int) -> int:
    # The paper's audio Transformer has 12 heads; keep as many as divide C (>= 7 patterns for C = 16..256).
    heads = min(12, channels)
    while channels % heads:
        heads -= 1
    return heads


@register_attn(
    "inputless",
    title=(
        "Input-independent Attention Weights Are Expressive Enough: A Study of Attention in "
        "Self-supervised Audio Transformers"
    ),
    arxiv="2006.05174",
    year=2020,
    family="nonlocal",
    complexity="O(N²·D)",
    flops_exponent=2.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="learned per-head attention maps that ignore the input, initialised from hand-crafted patterns",
    reference="none",
)
class InputIndependentAttention(AttnBlock):
    """``x + W_o softmax(R) G(x)`` per head with input-independent logits R ∈ R^{ℓ×ℓ}, ℓ = h_ref·w_ref.

    The first ``min(heads, 7)`` heads start from the paper's patterns (:func:`paper_patterns`): the logits
    are log-weights floored at -10, so softmax(R) reproduces the pattern. (The authors' code feeds the
    weights themselves to the softmax as logits, which flattens every pattern to nearly uniform attention;
    the paper describes initialising the attention *weights*.) Further heads start from N(0, 1) logits as in
    that code. ``trainable=False`` keeps the maps fixed (buffers). Resampling to H x W interpolates R's query
    and key grids; with ``causal=True`` keys after the query are masked after resampling and the softmax
    renormalises, so the forward-looking patterns ("next", "future", "last") fall back to the visible keys.
    The weights are shared by the batch, but the N x N map is inherent (``flops_exponent`` 2).

    Args:
        channels: input channels C.
        heads: heads (default: the largest divisor of C not above 12, the paper's head count).
        ref_size: reference grid (h_ref, w_ref) of the attention maps (int for a square).
        trainable: learn the maps (True) or keep the initial patterns fixed (False).
        causal: raster-order causal masking.
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        ref_size: int | tuple[int, int] = 16,
        trainable: bool = True,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(channels)
        heads = _default_heads(channels) if heads is None else heads
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or channels % heads:
            raise ValueError(
                f"inputless: heads must be a positive divisor of channels ({channels}), got {heads!r}"
            )
        dd = factory_kwargs(device, dtype)
        self.heads, self.causal = heads, causal
        self.ref_hw = check_ref_size(ref_size, "inputless")
        n_ref = self.ref_hw[0] * self.ref_hw[1]

        fixed = paper_patterns(n_ref)[:heads].log().clamp_min(_LOG_FLOOR)
        extra = torch.randn(heads - fixed.shape[0], n_ref, n_ref, dtype=torch.float64)
        logits = torch.cat([fixed, extra]).to(device=device, dtype=dtype or torch.get_default_dtype())
        if trainable:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)
        self.value = nn.Linear(channels, channels, **dd)
        self.proj = nn.Linear(channels, channels, **dd)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, ref_size={self.ref_hw}, causal={self.causal}"

    def attention_logits(self, height: int, width: int) -> torch.Tensor:
        """The (heads, N, N) logits resampled to H x W (before any causal mask)."""
        return resample_attention_map(self.logits, self.ref_hw, (height, width))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        v = split_heads(self.value(to_tokens(x)), self.heads)
        out = attend_with_weights(self.attention_logits(h, w), v, causal=self.causal)
        return x + to_map(self.proj(merge_heads(out)), h, w)
