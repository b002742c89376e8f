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
block-sparse patterns), :mod:`.pattern_multi` (the engine with pooled cells as extra keys: multiscale, BPT;
jukebox's per-layer patterns), :mod:`.learned_pattern` (patterns with learned parts: ETC's globals, SAC's
edges), :mod:`.grouped` (grouped SDPA in two steps: axial, interlaced), :mod:`.kernel` and
:mod:`.kernel_extra` (linear attention with a kernel feature map; RFA, DNL), :mod:`.landmarks` (Nyström),
:mod:`.compressed` (keys compressed along the token axis: Kronecker, Linformer, memory-compressed),
:mod:`.hashing` (LSH clusters: SMYRF, Reformer), :mod:`.routed` (content-routed: routing, Sinkhorn),
:mod:`.selection` (content-selected queries or keys: Informer, SCRAM, clustered attention), :mod:`.memory`
(row-band segments with memories: compressive, Memformer).
"""

from .base import DenseCore, MixerCore, prefix_dense
from .compressed import KroneckerCore, LinformerCore, MemoryCompressedCore
from .grouped import AxialCore, InterlacedCore
from .hashing import ReformerCore, SmyrfCore
from .kernel import KernelCore
from .kernel_extra import DnlCore, RfaCore
from .landmarks import NystromCore
from .learned_pattern import EtcCore, SacCore
from .memory import CompressiveCore, MemformerCore
from .pattern import BigBirdCore, BlockPatternCore, CrissCrossCore, RasterPatternCore, WindowCore
from .pattern_multi import BPTCore, JukeboxCore, MultiScaleCore
from .routed import RoutingCore, SinkhornCore
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
    "MultiScaleCore",
    "BPTCore",
    "JukeboxCore",
    "InformerCore",
    "ScramCore",
    "ClusteredCore",
    "KernelCore",
    "NystromCore",
    "SmyrfCore",
    "ReformerCore",
    "KroneckerCore",
    "LinformerCore",
    "MemoryCompressedCore",
    "EtcCore",
    "SacCore",
    "RoutingCore",
    "SinkhornCore",
    "CompressiveCore",
    "MemformerCore",
    "RfaCore",
    "DnlCore",
    "prefix_dense",
]
