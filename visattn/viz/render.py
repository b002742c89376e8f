"""Overlays of query maps on photos, with the block's name, paper and complexity in the caption.

Pillow composes the figure (so the PNG has exactly the asked size); matplotlib (the ``viz`` extra) lends its
colour map and the DejaVu font, which has the complexity formulas' glyphs (·, ², √).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..registry import attn_info
from .maps import attention_probs, build_block, feature_map, query_map, to_grid

__all__ = ["Panel", "colorize", "compose", "display_map", "overlay", "save_png", "viz_figure"]


def _matplotlib():
    try:
        import matplotlib
    except ImportError as err:
        raise ValueError("rendering needs matplotlib: pip install 'visattn[viz]'") from err
    return matplotlib


def colorize(m: torch.Tensor, *, cmap: str = "inferno", gamma: float = 0.5):
    """(h, w) non-negative map -> (h, w, 4) uint8 RGBA, normalised by its maximum; ``gamma`` < 1 lifts the
    weak tail so a wide but shallow field stays visible next to a strong identity peak."""
    import numpy as np

    mpl = _matplotlib()
    a = m.detach().float().clamp_min(0)
    top = float(a.max())
    a = (a / top) ** gamma if top > 0 else a
    rgba = mpl.colormaps[cmap](a.numpy())
    rgba[..., 3] = np.where(a.numpy() > 0, 0.35 + 0.6 * a.numpy(), 0.0)  # zero stays see-through
    return (rgba * 255).round().astype(np.uint8)


def display_map(m: torch.Tensor, cell: tuple[int, int]) -> torch.Tensor:
    """``m`` scaled to [0, 1] by its maximum outside the query ``cell = (col, row)``, the cell itself set to 1.

    The residual path makes the query pixel's own entry far larger than any other in most blocks; scaled by
    it, the field the block actually mixes in would be invisible.
    """
    col, row = cell
    out = m.detach().float().clone()
    out[row, col] = 0.0
    top = float(out.max())
    if top > 0:
        out /= top
    out[row, col] = 1.0
    return out


def overlay(image, m: torch.Tensor, size: tuple[int, int]):
    """The photo resized to ``size = (width, height)`` with the map (nearest-neighbour upsampled, so feature
    cells stay visible) blended over it; a PIL RGB image."""
    from PIL import Image

    base = Image.fromarray(image).convert("RGB").resize(size, Image.Resampling.BILINEAR)
    base = Image.blend(base, Image.new("RGB", size, (0, 0, 0)), 0.35)
    heat = Image.fromarray(colorize(m), mode="RGBA").resize(size, Image.Resampling.NEAREST)
    base.paste(heat, (0, 0), heat)
    return base


def _font(size: int):
    from PIL import ImageFont

    mpl = _matplotlib()
    path = os.path.join(mpl.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    try:
        return ImageFont.truetype(path, size)
    except OSError:
        return ImageFont.load_default()


@dataclass
class Panel:
    """One tile of a figure: a map over the photo, a title and query markers in image pixels."""

    title: str
    m: torch.Tensor
    markers: list[tuple[float, float]] = field(default_factory=list)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def compose(image, panels: list[list[Panel]], caption: str, size: tuple[int, int]):
    """A PIL image of exactly ``size = (width, height)``: rows x columns of panels, the caption below."""
    from PIL import Image, ImageDraw

    width, height = size
    if width < 16 or height < 16:
        raise ValueError(f"figure size must be at least 16x16 pixels, got {width}x{height}")
    rows, cols = len(panels), max(len(r) for r in panels)
    fig = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    font_px = max(8, min(18, width // 45))
    font, small = _font(font_px), _font(max(7, font_px - 2))
    cap_lines = _wrap(draw, caption, font, width - 8)
    cap_h = len(cap_lines) * (font_px + 4) + 6
    title_h = font_px + 6
    cell_w = max(1, width // cols)
    cell_h = max(1, (height - cap_h) // rows)
    ih, iw = image.shape[:2]
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            # The photo keeps its aspect ratio inside the cell.
            avail_w, avail_h = max(1, cell_w - 6), max(1, cell_h - title_h - 4)
            s = min(avail_w / iw, avail_h / ih)
            pw, ph = max(1, int(iw * s)), max(1, int(ih * s))
            x0 = c * cell_w + (cell_w - pw) // 2
            y0 = r * cell_h + title_h
            fig.paste(overlay(image, panel.m, (pw, ph)), (x0, y0))
            draw.text((c * cell_w + 4, r * cell_h + 2), panel.title, fill=(0, 0, 0), font=small)
            for mx, my in panel.markers:
                px, py = x0 + mx * s, y0 + my * s
                rad = max(3, pw // 60)
                draw.ellipse((px - rad, py - rad, px + rad, py + rad), outline=(0, 255, 255), width=2)
    y = height - cap_h + 3
    for line in cap_lines:
        draw.text((4, y), line, fill=(0, 0, 0), font=font)
        y += font_px + 4
    return fig


def save_png(img, path: str | Path) -> Path:
    """Write ``img`` as PNG atomically (:func:`visattn.atomic.atomic_write`)."""
    return atomic_write(path, lambda p: img.save(p, format="PNG", optimize=True))


def caption(name: str) -> str:
    """``name — paper (arXiv id, year) — complexity``."""
    info = attn_info(name)
    return f"{name} — {info.title} (arXiv {info.arxiv}, {info.year}) — {info.complexity}"


def viz_figure(
    name: str,
    image,
    queries: list[tuple[float, float]],
    *,
    causal: bool = False,
    grid: int = 32,
    channels: int = 16,
    size: tuple[int, int] | None = None,
    probs: bool = False,
    seed: int = 0,
    block_kwargs: dict | None = None,
):
    """The figure ``visattn viz`` writes: a bidirectional column and, with ``causal``, the causal one next
    to it; one row per query and, with ``probs``, below it a row of the softmax probabilities (mean over
    heads) where the block has them. ``queries`` are image pixels (x, y); the block runs on a feature map of
    ``grid`` cells on its longer side."""
    ih, iw = image.shape[:2]
    gh, gw = (grid, max(1, round(grid * iw / ih))) if ih >= iw else (max(1, round(grid * ih / iw)), grid)
    x = feature_map(image, channels, (gh, gw), seed=seed)
    cells = [to_grid(q, (ih, iw), (gh, gw)) for q in queries]
    kwargs = dict(block_kwargs or {})
    variants = [("bidirectional", False)] + ([("causal", True)] if causal else [])
    blocks = [build_block(name, channels, causal=c, seed=seed, **kwargs) for _, c in variants]
    maps = [query_map(b, x, cells, seed=seed) for b in blocks]
    rows: list[list[Panel]] = []
    for i, (qx, qy) in enumerate(queries):
        rows.append(
            [
                Panel(f"{label} |dy/dx| at ({qx:g}, {qy:g})", display_map(m[i], cells[i]), [(qx, qy)])
                for (label, _), m in zip(variants, maps, strict=True)
            ]
        )
        if probs:
            row = []
            for (label, _), block in zip(variants, blocks, strict=True):
                p = attention_probs(block, x, cells[i], seed=seed)
                if p is not None:
                    row.append(Panel(f"{label} softmax ({p.source}) at ({qx:g}, {qy:g})", p.mean, [(qx, qy)]))
            if row:
                rows.append(row)
    if size is None:
        cols = max(len(r) for r in rows)
        size = (min(1600, 420 * cols), min(1600, 420 * len(rows) + 60))
    return compose(image, rows, caption(name), size)
