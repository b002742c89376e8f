"""Models built from visattn blocks: timm backbones (and, later, segmentors)."""

from . import timm_registry  # noqa: F401  (registers visattn_<backbone>_<attn> names in timm)
from .backbones import create_model, insert_attention
from .timm_registry import registered_model_names

__all__ = ["create_model", "insert_attention", "registered_model_names"]
