"""What each block attends to, computed exactly: query maps, attention probabilities, effective receptive field.

Every block maps (B, C, H, W) to (B, C, H, W), so the dependence of one output pixel on the input is one
autograd call for any block, whether its attention is dense, linear, sparse, hashed or gated:

* :func:`query_map` — ``sum_{c_out, c_in} |d y[c_out, q] / d x[c_in, :, :]|``, the full Jacobian row of the
  query pixel ``q``, summed over channels. The block contract (batch independence in eval mode) lets one
  batched backward pass compute every output channel's row at once.
* :func:`attention_probs` — the softmax probabilities of blocks that have them (dense softmax attention
  through ``scaled_dot_product_attention`` over all pixels, and the sparse-pattern engine), per head and
  averaged, and the key set of pattern blocks.
* :func:`effective_receptive_field` — RepLKNet's measure (Ding et al. 2022, appendix): the gradient of the
  centre output pixel (summed over channels) w.r.t. the input, ReLU, summed over input channels and averaged
  over images, with the share of the map's area that carries 20/30/50/99 % of the contribution.

Identity-at-init blocks return their input at initialisation, so their map would be a single pixel: build
them with :func:`build_block` (``perturb=True``), which adds fixed-seed noise to the parameters, or pass a
block with trained weights.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..registry import attn_info, create_attn

__all__ = [
    "AttentionProbs",
    "ERF",
    "attention_probs",
    "build_block",
    "effective_receptive_field",
    "feature_map",
    "perturb_weights",
    "query_map",
    "to_grid",
]

#: Thresholds of RepLKNet's high-contribution area ratio.
ERF_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


def perturb_weights(
    block: torch.nn.Module, *, seed: int = 0, zero_scale: float = 0.2, rel_scale: float = 0.05
):
    """Add fixed-seed Gaussian noise to every floating parameter of ``block`` (in place) and return it.

    A zero-initialised tensor (an output projection or a residual gain) gets ``zero_scale * N(0, 1)``, so an
    identity-at-init block starts mixing pixels; any other tensor gets noise of ``rel_scale`` times its RMS,
    which keeps its scale (temperatures, norms, kernel bandwidths stay meaningful).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            rms = p.detach().float().pow(2).mean().sqrt().item() if p.numel() else 0.0
            scale = zero_scale if rms == 0.0 else rel_scale * rms
            p.add_((noise * scale).to(device=p.device, dtype=p.dtype))
    return block


def build_block(
    name: str,
    channels: int,
    *,
    causal: bool = False,
    perturb: bool = True,
    seed: int = 0,
    **kwargs: Any,
) -> torch.nn.Module:
    """``create_attn(name, channels, **kwargs)`` in eval mode, with ``causal=True`` passed when asked (a
    ValueError naming the block when it has no causal mode), built under a fixed seed and, with ``perturb``,
    with :func:`perturb_weights` applied."""
    if causal:
        if not attn_info(name).causal:
            raise ValueError(
                f"block {name!r} has no causal mode (AttnInfo.causal is False); drop causal / --causal or pick "
                "one of visattn.list_attns(causal=True)"
            )
        kwargs["causal"] = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = create_attn(name, channels, **kwargs)
    if perturb:
        perturb_weights(block, seed=seed)
    return block.eval()


def feature_map(image, channels: int, size: tuple[int, int], *, seed: int = 0) -> torch.Tensor:
    """A (1, channels, h, w) feature map of an RGB image (H, W, 3 uint8 array or PIL image).

    The image is resized (antialiased) to ``size = (h, w)`` and standardised; the first three channels are
    its colours and the others fixed random nonlinear mixtures of them, so content-dependent blocks (softmax,
    hashing, clustering) see structure that follows the photo.
    """
    import numpy as np
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"feature map size must be positive, got {h}x{w}")
    if channels < 3:
        raise ValueError(f"feature maps need at least 3 channels (the colours), got {channels}")
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    img = img.convert("RGB").resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None)
    rgb = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    rgb = (rgb - rgb.mean(dim=(1, 2), keepdim=True)) / (rgb.std(dim=(1, 2), keepdim=True) + 1e-3)
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels - 3, 3, generator=gen)
    bias = 0.5 * torch.randn(channels - 3, 1, 1, generator=gen)
    extra = torch.tanh(torch.einsum("oc,chw->ohw", mix, rgb) + bias)
    return torch.cat([rgb, extra], dim=0)[None]


def to_grid(
    point: tuple[float, float], image_size: tuple[int, int], grid: tuple[int, int]
) -> tuple[int, int]:
    """Image pixel ``(x, y)`` of an image of ``(height, width)`` -> feature-map cell ``(col, row)``."""
    (x, y), (ih, iw), (gh, gw) = point, image_size, grid
    if not (0 <= x < iw and 0 <= y < ih):
        raise ValueError(
            f"query {x},{y} lies outside the {iw}x{ih} image; give X in [0, {iw}) and Y in [0, {ih})"
        )
    return min(gw - 1, int(x * gw / iw)), min(gh - 1, int(y * gh / ih))


def _check_query(q, h: int, w: int) -> tuple[int, int]:
    col, row = int(q[0]), int(q[1])
    if not (0 <= col < w and 0 <= row < h):
        raise ValueError(f"query (x={col}, y={row}) lies outside the {w}x{h} feature map")
    return col, row


def query_map(
    block: torch.nn.Module,
    x: torch.Tensor,
    queries,
    *,
    chunk: int = 16,
    seed: int = 0,
    out_channels: int | None = None,
) -> torch.Tensor:
    """``(Q, H, W)``: for each query pixel ``(x, y)`` (column, row), ``sum |d y_q / d x|`` over the output and
    input channels, exact by autograd.

    ``x`` is one feature map, (C, H, W) or (1, C, H, W). The block runs in eval mode on a batch of copies of
    ``x``: sample ``i`` backpropagates output channel ``i % C`` of its query, which the contract's batch
    independence makes the Jacobian row of that channel. ``chunk`` bounds the batch (memory); ``seed`` fixes
    the randomness of stochastic blocks (hashing, random features) for every chunk alike. ``out_channels``
    sums over that many evenly spaced output channels instead of all C (cost is one backward pass per output
    channel: a 512-channel segmentation head is explained on a subset; the input channels are always all).
    """
    x = x.detach()
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(
            f"query_map: x must be one feature map (C, H, W) or (1, C, H, W), got {tuple(x.shape)}"
        )
    _, c, h, w = x.shape
    pts = [_check_query(q, h, w) for q in queries]
    if not pts:
        raise ValueError("query_map: give at least one query pixel")
    # (query, output channel) pairs, one per batch sample.
    if out_channels is None or out_channels >= c:
        chosen = list(range(c))
    else:
        chosen = sorted(
            {int(i) for i in torch.linspace(0, c - 1, max(1, int(out_channels))).round().tolist()}
        )
    pairs = [(qi, co) for qi in range(len(pts)) for co in chosen]
    out = torch.zeros(len(pts), h, w, dtype=torch.float32)
    was_training = block.training
    block.eval()
    try:
        for start in range(0, len(pairs), max(1, int(chunk))):
            part = pairs[start : start + max(1, int(chunk))]
            xb = x.expand(len(part), -1, -1, -1).clone().requires_grad_(True)
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.manual_seed(seed)
                y = block(xb)
                qi = torch.tensor([p[0] for p in part])
                co = torch.tensor([p[1] for p in part])
                rows = torch.tensor([pts[i][1] for i in qi.tolist()])
                cols = torch.tensor([pts[i][0] for i in qi.tolist()])
                picked = y[torch.arange(len(part)), co, rows, cols]
                (grad,) = torch.autograd.grad(picked.sum(), xb)
            contrib = grad.detach().abs().float().sum(dim=1)  # (n, H, W)
            out.index_add_(0, qi, contrib)
    finally:
        block.train(was_training)
    return out


# ------------------------------------------------------------------------------- attention probabilities


@dataclass(frozen=True)
class AttentionProbs:
    """The softmax probabilities of one query pixel over the feature map.

    Attributes:
        per_head: (heads, H, W) probabilities on the map's pixels.
        mean: (H, W) average over heads.
        key_set: (H, W) bool, the pixels the query may attend (pattern blocks; for dense attention every
            pixel, or the past when causal).
        extra_mass: (heads,) probability on keys that are not pixels (global tokens, memory, summaries).
        source: "pattern" (sparse-pattern engine) or "dense" (scaled_dot_product_attention over all pixels).
        calls: how many attention calls of the block's forward matched; the first one is shown.
    """

    per_head: torch.Tensor
    mean: torch.Tensor
    key_set: torch.Tensor
    extra_mass: torch.Tensor
    source: str
    calls: int


@contextlib.contextmanager
def _record_sparse_attention(records: list):
    """Temporarily wrap the sparse-pattern engine's ``sparse_attention`` wherever it was imported."""
    from ..layers import sparse_pattern

    original = sparse_pattern.sparse_attention

    def recording(q, k, v, pattern, heads, *, scale=None, bias=None):
        records.append((q.detach(), k.detach(), pattern, heads, scale, bias))
        return original(q, k, v, pattern, heads, scale=scale, bias=bias)

    # Blocks bind the function by name at import (``from ..layers.sparse_pattern import sparse_attention``),
    # so every visattn module holding the original gets the wrapper, and gets the original back after.
    patched = [
        mod
        for name, mod in list(sys.modules.items())
        if name.startswith("visattn") and getattr(mod, "sparse_attention", None) is original
    ]
    for mod in patched:
        mod.sparse_attention = recording
    try:
        yield
    finally:
        for mod in patched:
            mod.sparse_attention = original


class _SDPARecorder(torch.overrides.TorchFunctionMode):
    """Records the arguments of every ``scaled_dot_product_attention`` call."""

    def __init__(self, records: list) -> None:
        super().__init__()
        self.records = records

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
            bound = dict(zip(names, args))
            bound.update(kwargs)
            self.records.append(
                {
                    "q": bound["query"].detach(),
                    "k": bound["key"].detach(),
                    "mask": None if bound.get("attn_mask") is None else bound["attn_mask"].detach(),
                    "is_causal": bool(bound.get("is_causal", False)),
                    "scale": bound.get("scale"),
                }
            )
        return func(*args, **kwargs)


def _pattern_probs(record, pos: int, h: int, w: int):
    """Probabilities of grid query ``pos`` from a recorded ``sparse_attention`` call, scattered on the map."""
    from ..layers.sparse_pattern import segment_masks

    q, k, pattern, heads, scale, bias = record
    grid = pattern.grid
    d = q.shape[-1] // heads
    scale = d**-0.5 if scale is None else scale
    qh = q[0, pos].float().view(heads, d)
    kh = k[0].float().view(k.shape[1], heads, d)
    masks = segment_masks(pattern)
    bias = [None] * len(masks) if bias is None else list(bias)
    keys, scores = [], []
    for seg, m, b in zip(pattern.segments, masks, bias, strict=False):
        hit = (seg.queries == pos).nonzero()
        if not len(hit):
            continue
        t, i = hit[0].tolist()
        sel = m[t, i]
        idx = seg.keys[t][sel]
        s = torch.einsum("hd,khd->hk", qh, kh[idx]) * scale
        if b is not None:
            bb = b.float().expand(seg.queries.shape[0], heads, seg.queries.shape[1], seg.keys.shape[1])
            s = s + bb[t, :, i][:, sel]
        keys.append(idx)
        scores.append(s)
    probs_map = torch.zeros(heads, h, w)
    key_set = torch.zeros(h, w, dtype=torch.bool)
    extra = torch.zeros(heads)
    if not keys:
        return probs_map, key_set, extra
    idx = torch.cat(keys)
    p = torch.softmax(torch.cat(scores, dim=1), dim=1)
    on_grid = idx < grid.n
    g = idx[on_grid]
    if grid.length is not None:
        # A raster sequence viewed as a (rows, cols) grid: grid position = raster position.
        r, c = g // w, g % w
    else:
        r, c = g // grid.cols, g % grid.cols
    inside = (r < h) & (c < w)
    pg = p[:, on_grid][:, inside]
    probs_map.view(heads, h * w).index_add_(1, r[inside] * w + c[inside], pg)
    key_set[r[inside], c[inside]] = True
    extra = p[:, ~on_grid].sum(dim=1)
    return probs_map, key_set, extra


def _grid_position(pattern, col: int, row: int, w: int) -> int:
    grid = pattern.grid
    return row * w + col if grid.length is not None else row * grid.cols + col


def _dense_probs(rec, pos: int, h: int, w: int):
    n = h * w
    q, k = rec["q"].float(), rec["k"].float()
    q = q.reshape(-1, n, q.shape[-1])
    k = k.reshape(-1, n, k.shape[-1])
    scale = q.shape[-1] ** -0.5 if rec["scale"] is None else rec["scale"]
    s = torch.einsum("hd,hkd->hk", q[:, pos], k) * scale  # (heads, N)
    allowed = torch.ones_like(s, dtype=torch.bool)
    mask = rec["mask"]
    if mask is not None:
        mask = mask.expand(*rec["q"].shape[:-1], n).reshape(-1, n, n)[:, pos]
        if mask.dtype == torch.bool:
            allowed = allowed & mask
        else:
            s = s + mask.float()
            allowed = allowed & torch.isfinite(mask)
    if rec["is_causal"]:
        allowed = allowed & (torch.arange(n) <= pos)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=1).nan_to_num(0.0)
    return p.view(-1, h, w), allowed.any(0).view(h, w), torch.zeros(p.shape[0])


def attention_probs(
    block: torch.nn.Module, x: torch.Tensor, query, *, seed: int = 0
) -> AttentionProbs | None:
    """The softmax probabilities of query pixel ``query = (x, y)`` in one forward pass of ``block``, or None
    when the block has no softmax over the map's pixels (linear, low-rank, hashing-only, gates, ...).

    Pattern blocks (the sparse-pattern engine: Longformer, Big Bird, Diet, Jukebox, ...) give their exact key
    set and probabilities; other softmax blocks give them when a ``scaled_dot_product_attention`` call attends
    all H*W pixels from all H*W pixels in raster order (Non-local, DNL, DANet's position attention, ...).
    The first matching call of the forward pass is shown (``calls`` says how many there were).
    """
    x = x.detach()
    if x.dim() == 3:
        x = x[None]
    _, _, h, w = x.shape
    col, row = _check_query(query, h, w)
    sparse_rec: list = []
    dense_rec: list = []
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), _record_sparse_attention(sparse_rec):
            torch.manual_seed(seed)
            with _SDPARecorder(dense_rec):
                block(x)
    finally:
        block.train(was_training)
    if sparse_rec:
        rec = sparse_rec[0]
        per_head, key_set, extra = _pattern_probs(rec, _grid_position(rec[2], col, row, w), h, w)
        return AttentionProbs(per_head, per_head.mean(0), key_set, extra, "pattern", len(sparse_rec))
    matching = [
        r
        for r in dense_rec
        if r["q"].shape[-2] == h * w and r["k"].shape[-2] == h * w and r["q"].shape[0] == 1
    ]
    if matching:
        per_head, key_set, extra = _dense_probs(matching[0], row * w + col, h, w)
        return AttentionProbs(per_head, per_head.mean(0), key_set, extra, "dense", len(matching))
    return None


# ------------------------------------------------------------------------------ effective receptive field


@dataclass(frozen=True)
class ERF:
    """RepLKNet's effective receptive field of a block.

    Attributes:
        map: (H, W) mean over images of ``relu(d sum_c y[c, centre] / d x)`` summed over input channels.
        area_ratio: threshold -> the smallest centred square's area / map area whose contribution reaches
            that share of the total (``ERF_THRESHOLDS``: 20/30/50/99 %).
        images: how many images were averaged.
    """

    map: torch.Tensor
    area_ratio: dict[float, float]
    images: int


def _area_ratios(m: torch.Tensor, thresholds=ERF_THRESHOLDS) -> dict[float, float]:
    h, w = m.shape
    total = float(m.sum())
    cy, cx = h // 2, w // 2
    out: dict[float, float] = {}
    for t in thresholds:
        ratio = 1.0
        if total > 0:
            for r in range(max(h, w)):
                win = m[max(0, cy - r) : cy + r + 1, max(0, cx - r) : cx + r + 1]
                if float(win.sum()) >= t * total:
                    ratio = win.numel() / (h * w)
                    break
        out[t] = ratio
    return out


def effective_receptive_field(block: torch.nn.Module, images: torch.Tensor, *, seed: int = 0) -> ERF:
    """The effective receptive field of ``block`` over ``images`` (B, C, H, W), one image at a time."""
    if images.dim() != 4:
        raise ValueError(f"effective_receptive_field: images must be (B, C, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    acc = torch.zeros(h, w)
    was_training = block.training
    block.eval()
    try:
        for i in range(b):
            xi = images[i : i + 1].detach().clone().requires_grad_(True)
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                torch.manual_seed(seed)
                y = block(xi)
                (g,) = torch.autograd.grad(y[0, :, h // 2, w // 2].sum(), xi)
            acc += F.relu(g[0].detach().float()).sum(0)
    finally:
        block.train(was_training)
    m = acc / max(b, 1)
    return ERF(m, _area_ratios(m), b)
