"""Sub-Linear Memory: How to Make Performers SLiM — https://arxiv.org/abs/2012.11346

Sequence method on the flattened map (raster order), as ``performer`` (pre-norm tokens, fixed 2D
sin-cos position code, FAVOR+ features), with the causal prefix computation done in chunks whose
states are recomputed in backward: autograd keeps only the features and values, nothing per chunk.
"""

from __future__ import annotations

import torch

from ..layers.linear_attention import elu_feature_map
from ..registry import register_attn
from .performer import Performer


@register_attn(
    "slim",
    title="Sub-Linear Memory: How to Make Performers SLiM",
    arxiv="2012.11346",
    year=2020,
    family="linear",
    complexity="O(N·m·D) time, O(N·D) saved memory",
    flops_exponent=1.0,
    native_2d=False,
    causal=True,
    identity_init=True,
    idea="causal Performer whose backward recomputes chunked prefix sums, so training memory stays O(input)",
    reference="https://github.com/google-research/google-research/tree/master/performer/models/slim_performer",
)
class SLiMPerformer(Performer):
    """Causal FAVOR+ with a memory-lean backward (SLiM).

    The causal scan is a custom autograd function that saves only φ(Q), φ(K) and V; backward
    recomputes the chunk states and back-propagates through them chunk-wise, with exact gradients.
    Saved activations therefore grow as N·(m + D) like the inputs, without the chunk states and
    intra-chunk score matrices that plain autograd keeps. Without ``causal`` SLiM is the Performer
    (the non-causal form keeps only a D x D summary anyway).

    Args:
        channels: input channels C.
        heads: attention heads (default: heads of 32 channels, ``default_heads``).
        num_features: random features m (default d·ln d; d = head dim).
        feature_type: "favor+" (positive random features), "relu" (ReLU random features) or
            "elu+1" (deterministic), the paper's feature maps bar "sqr".
        redraw_interval: training calls between feature redraws (0: never).
        seed: base seed of the draws (None: from the global RNG at construction).
        eps: denominator epsilon.
        chunk_size: slice length of the causal computation; None (default) chooses it for the device
            at call time (visattn.layers.linear_attention.default_chunk_size), an int overrides it.
        causal: raster-order causal attention.
    """

    _recompute = True

    def __init__(
        self,
        channels: int,
        *,
        heads: int | None = None,
        num_features: int | None = None,
        feature_type: str = "favor+",
        redraw_interval: int = 1000,
        seed: int | None = None,
        eps: float = 1e-6,
        chunk_size: int | None = None,
        causal: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        if feature_type not in ("favor+", "relu", "elu+1"):
            raise ValueError(f"slim: feature_type must be 'favor+', 'relu' or 'elu+1', got {feature_type!r}")
        super().__init__(
            channels,
            heads=heads,
            num_features=num_features,
            kernel="relu" if feature_type == "relu" else "softmax",
            redraw_interval=redraw_interval,
            seed=seed,
            eps=eps,
            chunk_size=chunk_size,
            causal=causal,
            device=device,
            dtype=dtype,
        )
        self.feature_type = feature_type

    def features(self, q: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor):
        if self.feature_type == "elu+1":
            return elu_feature_map(q), elu_feature_map(k), None
        return super().features(q, k, tokens)
