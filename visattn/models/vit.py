"""Efficient attention as the attention of timm's vision transformers, pretrained weights kept.

:class:`ViTMixer` is a drop-in for timm's ``Attention`` (``timm.create_model(name, attn_layer=...)``, through
timm's public hook): it owns timm's ``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``proj`` (and the dropouts)
under timm's names, so timm's checkpoints load with no missing or unexpected key, and it runs a method's
functional core (:mod:`visattn.layers.mixer_cores`) on the pretrained q, k, v. Prefix tokens (class,
registers) are global tokens; patch tokens lie on the 2D patch grid, which a forward hook on the model's
``patch_embed`` reports to every mixer (:func:`attach_grid`; :func:`create_vit` installs it), so
``dynamic_img_size=True`` works at any input size.

``MIXERS`` is the capability table: block name -> (core class, fixed core arguments, the block
hyperparameters the mixer accepts, whether the method has a dense limit). ``visattn.list_attns(vit=True)``
reads it.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from ..layers import mixer_cores as mc
from ..registry import attn_info, list_attns

__all__ = [
    "MIXERS",
    "VIT_FAMILIES",
    "ViTMixer",
    "attach_grid",
    "create_vit",
    "mixer_class",
    "is_vit_backbone",
    "model_family",
    "vit_mixers",
]

_logger = logging.getLogger(__name__)


class MixerSpec(NamedTuple):
    """How a registered block runs as a ViT attention: its core, fixed core arguments, the hyperparameters
    it accepts (with the ViT defaults) and the setting that makes it exactly dense attention (or None)."""

    core: type[mc.MixerCore]
    fixed: dict[str, Any]
    params: dict[str, Any]
    dense_limit: str | None


MIXERS: dict[str, MixerSpec] = {
    "nonlocal": MixerSpec(mc.DenseCore, {}, {}, "always (embedded-Gaussian non-local = softmax attention)"),
    "longformer": MixerSpec(
        mc.WindowCore, {}, {"kernel_size": 15, "dilation": 1}, "kernel_size >= 2 * max(H, W) - 1"
    ),
    "ccnet": MixerSpec(mc.CrissCrossCore, {}, {}, None),
    "axial": MixerSpec(mc.AxialCore, {}, {}, None),
    "isa": MixerSpec(mc.InterlacedCore, {}, {"down_factor": (8, 8)}, "down_factor >= (H, W)"),
    "sparse_transformer": MixerSpec(
        mc.RasterPatternCore, {}, {"pattern": "strided", "stride": None, "summary": 8}, "stride >= H * W"
    ),
    "linear": MixerSpec(mc.KernelCore, {"kernel": "elu"}, {}, None),
    "performer": MixerSpec(mc.KernelCore, {"kernel": "favor+"}, {"num_features": None, "seed": 0}, None),
    "performer_v1": MixerSpec(mc.KernelCore, {"kernel": "trig"}, {"num_features": None, "seed": 0}, None),
    "efficient_attention": MixerSpec(mc.KernelCore, {"kernel": "efficient"}, {}, None),
    "dpfp": MixerSpec(mc.KernelCore, {"kernel": "dpfp"}, {"nu": 1}, None),
    "kronecker": MixerSpec(mc.KroneckerCore, {}, {"variant": "kv"}, None),
    "linformer": MixerSpec(
        mc.LinformerCore,
        {},
        {"k": 64, "sharing": "headwise", "ref_size": 14},
        None,
    ),
    "memory_compressed": MixerSpec(
        mc.MemoryCompressedCore,
        {},
        {"compression": 3},
        "compression=1 at initialisation (the compressing convolution starts as the identity)",
    ),
    "nystrom": MixerSpec(
        mc.NystromCore,
        {},
        {"landmarks": 64, "pinv_iterations": 6},
        "landmarks >= (H, W) with pinv_iterations=None (exact pseudo-inverse)",
    ),
    "smyrf": MixerSpec(
        mc.SmyrfCore, {}, {"n_hashes": 4, "cluster_size": 32, "seed": 0}, "cluster_size >= H * W"
    ),
    "bigbird": MixerSpec(
        mc.BigBirdCore,
        {},
        {"block_size": 8, "window": 3, "num_global": 2, "num_random": 3, "random_seed": 0},
        "block_size >= max(H, W) (one block of patches)",
    ),
    "diet": MixerSpec(
        mc.BlockPatternCore,
        {"block": "diet"},
        {"kernel_size": 3, "dilation": 1},
        "kernel_size >= 2 * max(H, W) - 1 with dilation=1",
    ),
    "gmat": MixerSpec(
        mc.WindowCore, {"method": "gmat"}, {"kernel_size": 15}, "kernel_size >= 2 * max(H, W) - 1"
    ),
    "slim": MixerSpec(mc.KernelCore, {"kernel": "favor+"}, {"num_features": None, "seed": 0}, None),
    "fanet": MixerSpec(mc.KernelCore, {"kernel": "cosine"}, {}, None),
    "rfa": MixerSpec(
        mc.RfaCore,
        {},
        {
            "num_features": 64,
            "kernel": "softmax",
            "sigma_init": 1.0,
            "redraw_interval": 1,
            "bound_denominator": True,
            "seed": 0,
        },
        None,
    ),
    "dnl": MixerSpec(mc.DnlCore, {}, {"temperature": 1.0}, None),
    "informer": MixerSpec(
        mc.InformerCore, {}, {"factor": 5, "seed": 0}, "factor with factor * ceil(ln N) >= H * W"
    ),
    "scram": MixerSpec(mc.ScramCore, {}, {"k": 16, "iterations": 4, "seed": 0}, "k >= H * W"),
    "routing": MixerSpec(
        mc.RoutingCore,
        {},
        {
            "num_clusters": 8,
            "local_ratio": 0.5,
            "local_window": 16,
            "ema_decay": 0.999,
            "commitment": 1e-4,
            "seed": None,
        },
        "num_clusters=1 and local_window >= max(H, W) (one cluster, one window)",
    ),
    "sinkhorn": MixerSpec(
        mc.SinkhornCore,
        {},
        {"window_size": 8, "temperature": 0.75, "sinkhorn_iter": 7},
        "window_size >= max(H, W) (one window covering the grid)",
    ),
    "reformer": MixerSpec(
        mc.ReformerCore,
        {},
        {"n_hashes": 8, "chunk_size": 64, "n_buckets": None, "allow_duplicates": False, "seed": 0},
        "chunk_size >= H * W / 2 (at most two chunks: each query chunk attends both)",
    ),
    "compressive": MixerSpec(
        mc.CompressiveCore,
        {},
        {"band_rows": 2, "mem_rows": None, "cmem_rows": None, "compression": 3},
        "band_rows >= H (one band of patch rows, no memory)",
    ),
    "memformer": MixerSpec(
        mc.MemformerCore, {}, {"num_slots": 64, "band_rows": 2, "write_temperature": 0.5}, None
    ),
    "clustered": MixerSpec(
        mc.ClusteredCore,
        {},
        {
            "clusters": 100,
            "iterations": 10,
            "bits": 32,
            "hash_bias": True,
            "improved": True,
            "topk": 32,
            "seed": 0,
        },
        "improved=True with topk >= N (all tokens), or improved=False with clusters >= H * W distinct codes",
    ),
    "etc": MixerSpec(
        mc.EtcCore,
        {},
        {"patch_size": 8, "local_radius": 6, "relative_max_distance": 12, "use_global": True},
        "use_global=False with local_radius >= max(H, W) - 1 and the relative embeddings (rel_long, "
        "rel_long_bias) at zero",
    ),
    "sac": MixerSpec(
        mc.SacCore,
        {},
        {"alpha": 16, "window": 3, "anchors": 8, "edge_dim": 8, "hidden": 32, "freqs": 4},
        "window >= max(H, W) - 1 and alpha >= H * W (every patch an edge)",
    ),
    "multiscale": MixerSpec(
        mc.MultiScaleCore,
        {},
        {"radius": 2, "levels": None},
        "radius >= ceil(max(H, W) / 2) - 1 (the fine window covers the grid, no pooled level)",
    ),
    "bpt": MixerSpec(
        mc.BPTCore,
        {},
        {"k": 1, "levels": None, "clip_levels": 10},
        "k >= ceil(max(H, W) / 2) - 1 (the fine window covers the grid, no level of cells)",
    ),
    "jukebox": MixerSpec(
        mc.JukeboxCore,
        {},
        {"attn_order": ("row", "column", "prev_row"), "block_ctx": None},
        "attn_order=('row',) with block_ctx >= H * W (one block)",
    ),
}

# Why a registered block is not a ViT mixer: by name (checked first), then by family.
REFUSED: dict[str, str] = {
    "danet": "its channel attention mixes channels (C x C affinities), not tokens, and its position half is "
    "the non-local block (use nonlocal)",
    "emanet": "it has no queries or keys: EM over K bases carried across batches rebuilds the features",
    "reconet": "it has no queries or keys: a rank-r tensor of gates from pooled channel/height/width vectors",
    "synthesizer": "its attention weights are synthesised without q·k (an MLP of each token or a learned "
    "map), so the pretrained q and k would be discarded and every weight would be new",
    "inputless": "its attention maps are learned and ignore the input, so the pretrained q and k would be "
    "discarded",
    "pkm": "product-key memory is a learned memory of |C|^2 keys and values (a feed-forward layer), not "
    "attention among tokens",
    "isab": "its m inducing points are new queries and its second attention needs a second set of q/k/v "
    "projections a pretrained ViT layer does not have",
    "lambda": "its heads share one key and one value of |k| = 16 channels (multi-query) with a positional "
    "lambda convolution, which a ViT's per-head q/k/v cannot be mapped onto",
    "star": "its satellites also read their layer-0 token embedding, which a ViT layer does not have; "
    "without it, it is longformer with kernel_size=3 and the prefix tokens as the relay",
    "autonl": "its softmax-free attention runs on a channel subset of a strided copy of the input with a "
    "depthwise output convolution: new operators in place of q·k, not a core over the pretrained q, k, v",
    "fractal": "its Tanimoto similarity of sigmoid(q) and sigmoid(k) re-weights V per pixel and per channel; "
    "applied to the pretrained q and k it would replace, not approximate, the softmax they were trained for",
    # Possible, not built (a later session): the reason says what it takes.
    "permutohedral": "its lattice filters one point set with itself (the block's features are both query and "
    "key) and approximates a Gaussian only in a few dimensions (the paper's filt_f = 8 learned features); on a "
    "ViT head's own q and k (two point sets, d = 16 to 64) most patch queries reach no key on the lattice "
    "(0/0: 10% at d = 16, 84% at d = 64, 197 tokens) and the rest are off the exact Gaussian attention by "
    "more than its norm, at 9 s per image and head for d = 64 on a CPU; a low-dimensional feature "
    "projection (the block's conv_feat) would be a new module in place of the pretrained q and k",
}
_REFUSED_FAMILIES = {
    "gate": "a channel/spatial gate reweights features of one token; it does not mix tokens, so it cannot "
    "replace a ViT's attention",
    "conv": "a convolutional context module, not attention over q, k, v",
}

# timm model modules whose VisionTransformer takes ``attn_layer`` with timm's Attention signature.
VIT_FAMILIES = ("vision_transformer",)
# timm modules of transformer families without that hook (refused rather than sent to the CNN path).
_OTHER_TRANSFORMERS = (
    "beit", "cait", "crossvit", "deit", "eva", "hiera", "levit", "mvitv2", "naflexvit", "pit", "swin_transformer",
    "swin_transformer_v2", "tnt", "twins", "vision_transformer_hybrid", "vision_transformer_relpos",
    "vision_transformer_sam", "vitamin", "volo", "xcit",
)  # fmt: skip


def vit_mixers() -> list[str]:
    """Registered blocks that run as ViT attention (sorted)."""
    registered = set(list_attns())
    return sorted(name for name in MIXERS if name in registered)


def model_family(backbone: str) -> str:
    """The timm module (family) that defines ``backbone``, e.g. ``"vision_transformer"``."""
    import timm.models

    module = timm.models.model_entrypoint(backbone).__module__
    return module.rsplit(".", 1)[-1]


def is_vit_backbone(backbone: str) -> bool:
    """Whether ``backbone`` is a transformer family: the supported ViTs and the refused ones (so that a
    Swin or EVA gets a clear refusal instead of the CNN insertion path)."""
    family = model_family(backbone)
    return family in VIT_FAMILIES or family in _OTHER_TRANSFORMERS


def _refusal(name: str) -> str:
    info = attn_info(name)
    reason = REFUSED.get(name) or _REFUSED_FAMILIES.get(
        info.family,
        f"no functional core over a ViT's q, k, v is implemented for it yet (family {info.family!r})",
    )
    return (
        f"{name} cannot be a ViT attention: {reason}. ViT mixers: {', '.join(vit_mixers())} "
        "(visattn.list_attns(vit=True)); insert it into a CNN instead (e.g. resnet50)"
    )


class _GridContext:
    """The patch grid of the forward in progress, written by the ``patch_embed`` hook (not a module)."""

    def __init__(self, prefix: int) -> None:
        self.prefix = prefix
        self.grid: tuple[int, int] | None = None


class _GridHook:
    """The ``patch_embed`` forward hook that reports the grid to the mixers' :class:`_GridContext`. An
    object rather than a closure: ``copy.deepcopy(model)`` (an EMA copy, say) then copies the hook with
    the context, and the copy's mixers hear their own patch_embed, not the original's."""

    def __init__(self, ctx: _GridContext) -> None:
        self.ctx = ctx

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        if output.dim() == 4:  # dynamic_img_size: NHWC patch map
            self.ctx.grid = (int(output.shape[1]), int(output.shape[2]))
        else:
            self.ctx.grid = tuple(int(s) for s in module.dynamic_feat_size(inputs[0].shape[-2:]))


class ViTMixer(nn.Module):
    """timm ``Attention``-compatible module that runs the method ``method`` on timm's q, k, v.

    Build a class for a method with :func:`mixer_class` (timm's ``_create_attn`` needs a class); its
    constructor takes timm's arguments (``dim``, ``num_heads``, ``qkv_bias``, ``qk_norm``, ``scale_norm``,
    ``proj_bias``, ``attn_drop``, ``proj_drop``, ``norm_layer``, ``device``, ``dtype``). Attention dropout
    is not applied by the efficient cores (their weights are never formed); ``attn_drop`` must be 0.
    """

    method: str = "nonlocal"
    method_kwargs: dict[str, Any] = {}

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        name = self.method
        if dim % num_heads:
            raise ValueError(f"ViTMixer ({name}): dim ({dim}) must be divisible by num_heads ({num_heads})")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError(f"ViTMixer ({name}): qk_norm/scale_norm need norm_layer")
        if attn_drop:
            raise ValueError(
                f"ViTMixer ({name}): attn_drop={attn_drop} is not supported (efficient attention never forms "
                "the attention weights to drop); build the model with attn_drop_rate=0"
            )
        dd = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        # timm's names, so its checkpoints load unchanged.
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        spec = MIXERS[name]
        self.core = spec.core(dim, num_heads, **spec.fixed, **self.method_kwargs)
        if device is not None or dtype is not None:
            self.core.to(**{k: v for k, v in dd.items() if v is not None})
        self._grid_ctx: _GridContext | None = None
        self._warned = False

    def init_weights(self) -> None:
        """timm's ViT init calls this after initialising the children (its Linear layers get timm's init):
        the method's own new parameters then get the initialisation of the method's paper
        (``core.reset_parameters``), not timm's or PyTorch's default."""
        reset = getattr(self.core, "reset_parameters", None)
        if reset is not None:
            reset()

    def _grid(self, n: int) -> tuple[tuple[int, int], int]:
        ctx = self._grid_ctx
        if ctx is not None and ctx.grid is not None:
            (gh, gw), prefix = ctx.grid, ctx.prefix
            if prefix + gh * gw == n:
                return (gh, gw), prefix
            raise ValueError(
                f"ViTMixer ({self.method}): got {n} tokens but the patch grid is {gh}x{gw} with {prefix} prefix "
                "tokens; call the model's forward (or forward_features/forward_intermediates) on images"
            )
        # Not attached (timm.create_model(..., attn_layer=...) directly): a square grid with a few prefix
        # tokens is the only unambiguous reading of n tokens.
        side = math.isqrt(n)
        prefix = n - side * side
        if prefix > 16:
            raise ValueError(
                f"ViTMixer ({self.method}): cannot tell the patch grid of {n} tokens; build the model with "
                "visattn.create_model or call visattn.models.vit.attach_grid(model) after timm.create_model"
            )
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"ViTMixer ({self.method}): patch grid inferred as {side}x{side} with {prefix} prefix tokens; "
                "call visattn.models.vit.attach_grid(model) for non-square inputs",
                stacklevel=3,
            )
        return (side, side), prefix

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(
                f"ViTMixer ({self.method}): attn_mask / is_causal are not supported by the efficient mixers"
            )
        b, n, c = x.shape
        grid, prefix = self._grid(n)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = self.core(q, k, v, grid, prefix)
        out = self.norm(out.transpose(1, 2).reshape(b, n, c))
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        kw = ", ".join(f"{k}={v!r}" for k, v in self.method_kwargs.items())
        return f"method={self.method!r}, num_heads={self.num_heads}" + (f", {kw}" if kw else "")


def _freeze(kwargs: dict[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))


def mixer_class(name: str, **method_kwargs: Any) -> type[ViTMixer]:
    """A :class:`ViTMixer` subclass running block ``name`` with ``method_kwargs``, usable as
    ``timm.create_model(vit_name, attn_layer=mixer_class("performer", num_features=64))``.

    ValueError when ``name`` is not a mixer (with the reason) or a keyword is not one of its hyperparameters.
    """
    attn_info(name)  # unknown name: the registry's ValueError with close names
    if name not in MIXERS:
        raise ValueError(_refusal(name))
    accepted = MIXERS[name].params
    bad = sorted(set(method_kwargs) - set(accepted))
    if bad:
        raise ValueError(
            f"{name} as a ViT attention does not take {bad}; it accepts {sorted(accepted) or 'no arguments'}"
        )
    return _mixer_class(name, _freeze(method_kwargs))


@functools.cache
def _mixer_class(name: str, frozen: tuple) -> type[ViTMixer]:
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in frozen}
    cls = type(f"ViTMixer_{name}", (ViTMixer,), {"method": name, "method_kwargs": kwargs})
    cls.__module__ = __name__
    # Validate the hyperparameters once, here, rather than at the first layer of a big model.
    MIXERS[name].core(64, 1, **MIXERS[name].fixed, **kwargs)
    return cls


def attach_grid(model: nn.Module) -> nn.Module:
    """Tell every :class:`ViTMixer` of a timm ViT the patch grid of each forward (a forward hook on
    ``model.patch_embed``) and the number of prefix tokens; returns ``model``."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None:
        raise ValueError(
            f"attach_grid: {type(model).__name__} has no patch_embed; pass a timm VisionTransformer"
        )
    ctx = _GridContext(int(getattr(model, "num_prefix_tokens", 0)))
    patch_embed.register_forward_hook(_GridHook(ctx))
    mixers = [m for m in model.modules() if isinstance(m, ViTMixer)]
    for index, m in enumerate(mixers):
        m._grid_ctx = ctx
        # Methods that differ per layer (jukebox cycles its patterns across layers) read their depth here.
        m.core.layer_index = index
    return model


def create_vit(
    backbone: str,
    attn: str | None,
    *,
    attn_kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    **timm_kwargs: Any,
) -> nn.Module:
    """timm's ViT ``backbone`` whose attention layers run block ``attn`` (see :func:`mixer_class`); the
    route ``visattn.create_model`` takes for the ViT family. ``pretrained=True`` loads timm's weights into
    the mixers (timm's names; every key of timm's checkpoint, and the only keys left out are the method's
    new parameters); those are listed in one log line."""
    import timm

    family = model_family(backbone)
    if family not in VIT_FAMILIES:
        raise ValueError(
            f"{backbone} (timm family {family!r}) has no attn_layer hook for visattn's ViT mixers; supported "
            f"transformer families: {', '.join(VIT_FAMILIES)} (e.g. vit_small_patch16_224); CNN families take "
            "any block through visattn.create_model's insertion path"
        )
    if "attn_layer" in timm_kwargs:
        raise ValueError(
            "create_model: pass the method as attn=..., not attn_layer=... (it is set from attn)"
        )
    if attn is not None:
        timm_kwargs["attn_layer"] = mixer_class(attn, **(attn_kwargs or {}))
    elif attn_kwargs:
        raise ValueError("create_model: attn_kwargs given without attn")
    if pretrained:
        from .backbones import pretrained_weights_offline_check

        timm_kwargs = pretrained_weights_offline_check(backbone, timm_kwargs)
    new_state = attn is not None and _has_new_state(timm_kwargs["attn_layer"])
    model = timm.create_model(backbone, pretrained=pretrained and not new_state, **timm_kwargs)
    if attn is not None:
        attach_grid(model)
        mixers = [n for n, m in model.named_modules() if isinstance(m, ViTMixer)]
        timm_keys = {"qkv", "q_norm", "k_norm", "norm", "proj"}
        new = [
            f"{n}.{k}"
            for n in mixers
            for k in model.get_submodule(n).state_dict()
            if k.split(".", 1)[0] not in timm_keys
        ]
        if pretrained and new_state:
            _load_timm_weights(model, backbone, timm_kwargs, new)
        _logger.info(
            "visattn: %s attention in %d layer(s) of %s%s; the method's new parameters: %s",
            attn,
            len(mixers),
            backbone,
            " (timm's weights)" if pretrained else "",
            ", ".join(new) if new else "none",
        )
    return model


def _has_new_state(cls: type[ViTMixer]) -> bool:
    """Whether the method's core holds parameters or buffers of its own (keys a timm checkpoint lacks)."""
    spec = MIXERS[cls.method]
    return bool(spec.core(64, 1, **spec.fixed, **cls.method_kwargs).state_dict())


def _load_timm_weights(model: nn.Module, backbone: str, timm_kwargs: dict[str, Any], new: list[str]) -> None:
    """Load timm's pretrained weights into a ViT whose mixers have new parameters: timm's own dense model
    loads them (strictly, with timm's resizing of position embeddings), then every one of its keys goes into
    ``model``; the keys ``model`` misses must be exactly the method's new ones."""
    import timm

    dense_kwargs = {k: v for k, v in timm_kwargs.items() if k != "attn_layer"}
    dense = timm.create_model(backbone, pretrained=True, **dense_kwargs)
    result = model.load_state_dict(dense.state_dict(), strict=False)
    if result.unexpected_keys or sorted(result.missing_keys) != sorted(new):
        raise ValueError(
            f"create_model({backbone!r}): timm's checkpoint does not fit the mixers: unexpected keys "
            f"{result.unexpected_keys[:5]}, missing keys other than the method's own "
            f"{sorted(set(result.missing_keys) - set(new))[:5]}"
        )
