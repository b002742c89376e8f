"""Functional cores of the token-mixing methods on given queries, keys and values (the ViT mixers).

A core takes per-head ``q, k, v`` of shape ``(B, h, P + H*W, d)``: ``P`` prefix tokens (a ViT's class and
register tokens) first, then the patch tokens of an ``H x W`` grid in raster order, and returns the attended
values in the same layout. It adds no projection of its own, so a ViT's pretrained q/k/v/proj are used as
they are (see :mod:`visattn.models.vit`). Every core follows one rule for the prefix tokens: they are
global tokens, so each prefix query attends every token exactly (dense softmax, O(P·N)), and every patch
query has the prefix keys in its key set (one joint softmax with the method's own keys; for methods made of
two sequential steps, in the last step).

One module per family, each calling a shared engine and the blocks' own functions (patterns, hashing,
clustering, feature maps): :mod:`.pattern` (the sparse-pattern engine: windows, criss-cross, raster and
block-sparse patterns), :mod:`.grouped` (grouped SDPA in two steps: axial, interlaced), :mod:`.kernel`
(linear attention with a kernel feature map), :mod:`.landmarks` (Nyström), :mod:`.hashing` (LSH clusters:
SMYRF, Reformer), :mod:`.selection` (content-selected queries or keys: Informer, SCRAM, clustered attention).
"""

from .base import DenseCore, MixerCore, prefix_dense
from .grouped import AxialCore, InterlacedCore
from .hashing import ReformerCore, SmyrfCore
from .kernel import KernelCore
from .landmarks import NystromCore
from .pattern import BigBirdCore, BlockPatternCore, CrissCrossCore, RasterPatternCore, WindowCore
from .selection import ClusteredCore, InformerCore, ScramCore

__all__ = [
    "MixerCore",
    "DenseCore",
    "WindowCore",
    "CrissCrossCore",
    "AxialCore",
    "InterlacedCore",
    "RasterPatternCore",
    "BlockPatternCore",
    "BigBirdCore",
    "InformerCore",
    "ScramCore",
    "ClusteredCore",
    "KernelCore",
    "NystromCore",
    "SmyrfCore",
    "ReformerCore",
    "prefix_dense",
]
