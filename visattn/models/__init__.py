"""Models built from visattn blocks: timm backbones, segmentors, mmsegmentation checkpoint conversion."""

from . import timm_registry  # noqa: F401  (registers visattn_<backbone>_<attn> names in timm)
from .backbones import create_model, insert_attention
from .convert import convert_mmseg, to_mmseg
from .segmentor import Segmentor, create_segmentor, pop_attention_aux_losses
from .timm_registry import registered_model_names

__all__ = [
    "Segmentor",
    "convert_mmseg",
    "create_model",
    "create_segmentor",
    "insert_attention",
    "pop_attention_aux_losses",
    "registered_model_names",
    "to_mmseg",
]
