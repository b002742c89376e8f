"""Building blocks shared by two or more attention blocks."""

from .attention import (
    MultiHeadAttention,
    default_heads,
    merge_heads,
    multihead_sdpa,
    raster_causal_mask,
    resolve_heads,
    split_heads,
)
from .block import AttnBlock, check_feature_map, check_odd_kernel, factory_kwargs
from .padding import ceil_div, pad_to_grid, pad_to_multiple, unpad
from .pos_embed import ConvPosEnc, sincos_2d
from .precision import accuracy_dtype, upcast_for_accuracy
from .tokens import to_map, to_tokens

__all__ = [
    "AttnBlock",
    "ConvPosEnc",
    "MultiHeadAttention",
    "accuracy_dtype",
    "check_feature_map",
    "check_odd_kernel",
    "default_heads",
    "factory_kwargs",
    "merge_heads",
    "multihead_sdpa",
    "ceil_div",
    "pad_to_grid",
    "pad_to_multiple",
    "raster_causal_mask",
    "resolve_heads",
    "sincos_2d",
    "split_heads",
    "to_map",
    "to_tokens",
    "unpad",
    "upcast_for_accuracy",
]
