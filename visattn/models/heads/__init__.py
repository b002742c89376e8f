"""Decode heads: mmsegmentation's attention heads (structurally identical, so their checkpoints load) and
``AttnHead`` for any registry block.

``HEADS`` maps the method names of the model zoo (``<method>_r50-d8_...``) to their head classes.
"""

from __future__ import annotations

from .attn_head import AttnHead
from .cc_head import CCHead
from .common import DecodeHead, conv_bn_relu
from .da_head import DAHead
from .dnl_head import DNLHead
from .ema_head import EMAHead
from .fcn import FCNAttnHead, FCNHead
from .gc_head import GCHead
from .isa_head import ISAHead
from .nl_head import NLHead

HEADS: dict[str, type[DecodeHead]] = {
    "fcn": FCNHead,
    "ccnet": CCHead,
    "emanet": EMAHead,
    "gcnet": GCHead,
    "isanet": ISAHead,
    "nonlocal": NLHead,
    "dnl": DNLHead,
    "danet": DAHead,
    "attn": AttnHead,
}

__all__ = [
    "HEADS",
    "AttnHead",
    "CCHead",
    "DAHead",
    "DNLHead",
    "DecodeHead",
    "EMAHead",
    "FCNAttnHead",
    "FCNHead",
    "GCHead",
    "ISAHead",
    "NLHead",
    "conv_bn_relu",
]
