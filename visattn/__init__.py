"""visattn: efficient attention blocks for computer vision, one contract, tested and measured."""

from . import attn as _attn  # noqa: F401  (registers every block)
from . import hub
from .models import create_model, create_segmentor
from .registry import AttnInfo, attn_info, create_attn, list_attns, register_attn

__version__ = "0.1.0"

__all__ = [
    "AttnInfo",
    "attn_info",
    "create_attn",
    "create_model",
    "create_segmentor",
    "hub",
    "list_attns",
    "register_attn",
    "__version__",
]
