"""Shared rendering pieces: colormap lookup tables, the colour-bar legend, the panel grid.

Everything is numpy + PIL so that a web request can render every head of every layer in
well under a second. matplotlib is touched once per colormap name, only to read its
lookup table; nothing here creates a matplotlib figure.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LUT_SIZE = 256
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)  # labels, ticks, titles
LABEL_SIZE = 14  # px, panel labels
TITLE_SIZE = 17  # px, the title line
TICK_SIZE = 12  # px, colour-bar and axis ticks
PAD = 8  # px between panels and around the canvas


# ---------------------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _lut(name: str) -> np.ndarray:
    import matplotlib  # only for the table; imported lazily, once

    rgba = matplotlib.colormaps[name](np.linspace(0.0, 1.0, LUT_SIZE))  # (256, 4) float
    lut = np.round(rgba[:, :3] * 255).astype(np.uint8)  # (256, 3)
    lut.setflags(write=False)
    return lut


def colormap_lut(name: str = "inferno") -> np.ndarray:
    """(256, 3) uint8 RGB table of a matplotlib colormap, cached per name (read-only)."""
    return _lut(name)


def to_index(x01: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped; NaN -> 0) to LUT rows, uint8."""
    x = np.nan_to_num(np.asarray(x01, dtype=np.float32), nan=0.0)
    return (np.clip(x, 0.0, 1.0) * (LUT_SIZE - 1) + 0.5).astype(np.uint8)


def apply_colormap(x01: np.ndarray, name: str = "inferno") -> np.ndarray:
    """(...,) values in [0, 1] -> (..., 3) uint8 RGB; values outside [0, 1] are clipped."""
    return colormap_lut(name)[to_index(x01)]


def normalise(x: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(x - vmin) / (vmax - vmin) clipped to [0, 1], float32; a flat range maps to 0."""
    span = float(vmax) - float(vmin)
    x = np.asarray(x, dtype=np.float32)
    if not span > 0:
        return np.zeros_like(x)
    return np.clip((x - np.float32(vmin)) * np.float32(1.0 / span), 0.0, 1.0)


def value_range(maps: np.ndarray) -> tuple[float, float]:
    """(vmin, vmax) for one shared scale: 0 (or the minimum if negative) to the maximum."""
    finite = np.asarray(maps, dtype=np.float32)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    vmin = min(0.0, float(finite.min()))
    vmax = float(finite.max())
    if not vmax > vmin:
        vmax = vmin + 1.0
    return vmin, vmax


def text_colour_for(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 background colours -> (..., 3) uint8 black or white text, whichever reads."""
    lum = (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0  # (...,)
    return np.repeat(np.where(lum[..., None] > 0.55, 0, 255).astype(np.uint8), 3, axis=-1)


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def font(size: int = LABEL_SIZE) -> ImageFont.FreeTypeFont:
    """PIL's bundled default font (DejaVu-like, FreeType) at a pixel size, cached."""
    return ImageFont.load_default(size=size)


def text_size(text: str, size: int = LABEL_SIZE) -> tuple[int, int]:
    """(width, height) in px of a single line, height measured from the top of the line box."""
    left, top, right, bottom = font(size).getbbox(text)
    return int(math.ceil(right)), int(math.ceil(bottom))


def nice_ticks(vmin: float, vmax: float, target: int = 5) -> tuple[np.ndarray, int]:
    """Round tick values inside [vmin, vmax] (about `target` of them) and the decimals to print."""
    span = float(vmax) - float(vmin)
    if not span > 0:
        return np.array([vmin]), 2
    raw = span / max(target - 1, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * mag >= raw:
            break
    step = m * mag
    first = math.ceil(vmin / step - 1e-9) * step
    ticks = np.arange(first, vmax + step * 1e-6, step)
    decimals = max(0, -int(math.floor(math.log10(step))) + (1 if m == 2.5 else 0))
    return ticks, decimals


def format_tick(value: float, decimals: int) -> str:
    s = f"{value:.{decimals}f}"
    return "0" if float(s) == 0 else s


# ---------------------------------------------------------------------------------------
# Legend and layout
# ---------------------------------------------------------------------------------------


def colorbar(length: int, vmin: float, vmax: float, name: str = "inferno", label: str = "",
             *, thickness: int = 14, vertical: bool = True) -> Image.Image:
    """A legend strip: the colormap from vmin to vmax with round tick values and a label.

    `length` is the bar's height (vertical) or width (horizontal) in px. Vertical bars put
    vmax at the top, ticks to the right and the label above; horizontal bars put vmin at
    the left, ticks below and the label above.
    """
    length = max(int(length), 16)
    lut = colormap_lut(name)
    ticks, decimals = nice_ticks(vmin, vmax)
    tick_text = [format_tick(t, decimals) for t in ticks]
    tf = font(TICK_SIZE)
    label_lines = label.split("\n") if label else []
    label_h = sum(text_size(s, TICK_SIZE)[1] + 2 for s in label_lines) + (4 if label_lines else 0)
    label_w = max((text_size(s, TICK_SIZE)[0] for s in label_lines), default=0)
    tick_w = max(text_size(s, TICK_SIZE)[0] for s in tick_text)
    tick_h = text_size("0.9", TICK_SIZE)[1]
    ramp = np.linspace(0.0, 1.0, length)  # (length,)

    if vertical:
        bar = lut[to_index(ramp[::-1])]  # (length, 3): vmax at the top
        bar = np.repeat(bar[:, None, :], thickness, axis=1)  # (length, thickness, 3)
        x0, y0 = 2, label_h + tick_h // 2 + 1
        width = max(x0 + thickness + 5 + tick_w + 4, label_w + 4)
        height = y0 + length + tick_h // 2 + 3
    else:
        bar = lut[to_index(ramp)]  # (length, 3): vmin at the left
        bar = np.repeat(bar[None, :, :], thickness, axis=0)  # (thickness, length, 3)
        x0, y0 = tick_w // 2 + 2, label_h
        width = max(x0 + length + tick_w // 2 + 2, label_w + 4)
        height = y0 + thickness + 5 + tick_h + 4

    img = Image.new("RGB", (width, height), BACKGROUND)
    img.paste(Image.fromarray(np.ascontiguousarray(bar)), (x0, y0))
    draw = ImageDraw.Draw(img)
    y = 0
    for line in label_lines:
        draw.text((1, y), line, fill=INK, font=tf)
        y += text_size(line, TICK_SIZE)[1] + 2
    bw, bh = (thickness, length) if vertical else (length, thickness)
    draw.rectangle((x0 - 1, y0 - 1, x0 + bw, y0 + bh), outline=INK)
    span = float(vmax) - float(vmin) or 1.0
    for t, s in zip(ticks, tick_text):
        f = (float(t) - float(vmin)) / span
        if vertical:
            ty = y0 + int(round((1.0 - f) * (length - 1)))
            draw.line((x0 + bw, ty, x0 + bw + 3, ty), fill=INK)
            draw.text((x0 + bw + 5, ty), s, fill=INK, font=tf, anchor="lm")
        else:
            tx = x0 + int(round(f * (length - 1)))
            draw.line((tx, y0 + bh, tx, y0 + bh + 3), fill=INK)
            draw.text((tx, y0 + bh + 5), s, fill=INK, font=tf, anchor="mt")
    return img


def head_labels(labels: list[str] | None, n_heads: int, show_mean: bool) -> list[str]:
    """The given labels (default "H0".."H{h-1}"), plus "mean" when the average is shown."""
    labels = [f"H{i}" for i in range(n_heads)] if labels is None else list(labels)
    if len(labels) != n_heads:
        raise ValueError(f"got {len(labels)} labels for {n_heads} heads")
    return labels + (["mean"] if show_mean else [])


def grid(panels: list[Image.Image], labels: list[str] | None = None, cols: int | None = None,
         title: str | None = None, legend: Image.Image | None = None) -> Image.Image:
    """Tile panels row-major with a label above each, a title line on top, the legend on the right.

    Cells are as big as the largest panel; `cols` defaults to one row for up to 4 panels,
    then a near-square layout.
    """
    n = len(panels)
    if n == 0:
        raise ValueError("grid() needs at least one panel")
    labels = list(labels) if labels is not None else [""] * n
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} panels")
    cols = max(1, min(cols or default_cols(n), n))
    rows = math.ceil(n / cols)
    cell_w = max(p.width for p in panels)
    cell_h = max(p.height for p in panels)
    label_h = text_size("Hg", LABEL_SIZE)[1] + 4 if any(labels) else 0
    title_h = text_size("Hg", TITLE_SIZE)[1] + PAD if title else 0

    grid_w = PAD + cols * (cell_w + PAD)
    width = grid_w + (legend.width + PAD if legend is not None else 0)
    if title:
        width = max(width, text_size(title, TITLE_SIZE)[0] + 2 * PAD)
    height = PAD + title_h + rows * (label_h + cell_h + PAD)
    if legend is not None:
        height = max(height, PAD + title_h + label_h + legend.height + PAD)

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, PAD), title, fill=INK, font=font(TITLE_SIZE))
    lf = font(LABEL_SIZE)
    for i, (panel, label) in enumerate(zip(panels, labels)):
        r, c = divmod(i, cols)
        x = PAD + c * (cell_w + PAD)
        y = PAD + title_h + r * (label_h + cell_h + PAD)
        if label:
            draw.text((x, y), label, fill=INK, font=lf)
        canvas.paste(panel, (x, y + label_h))
    if legend is not None:
        canvas.paste(legend, (grid_w, PAD + title_h + label_h))
    return canvas


def default_cols(n: int) -> int:
    """One row for up to 4 panels, else the smallest near-square layout."""
    return n if n <= 4 else math.ceil(math.sqrt(n))


# zlib level of every PNG the sandbox writes: 1 encodes a map grid in about a quarter of the time of
# PIL's default (6) for files about a fifth larger; the app writes one per layer and modality per request
PNG_COMPRESS_LEVEL = 1


def save_png(img: Image.Image, path: str | Path) -> Path:
    """Write a PNG fast (PNG_COMPRESS_LEVEL), creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return path
