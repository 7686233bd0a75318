"""Rendering only: per-head attention maps drawn over images, token lists and spectrograms.

Pure functions over numpy arrays, numpy + PIL throughout (matplotlib only supplies the
colormap tables), fast enough to draw every head of every layer per web request.
Each `*_head_grid` is its `*_panels` (one picture per map, plus the legend) laid out by `grid`.
"""

from multimodal.overlays.audio import audio_head_grid, audio_panels, log_mel
from multimodal.overlays.common import apply_colormap, colorbar, colormap_lut, grid, save_png
from multimodal.overlays.image import image_head_grid, image_panels, overlay
from multimodal.overlays.text import text_head_grid, text_html, text_panels, token_scores

__all__ = [
    "apply_colormap", "audio_head_grid", "audio_panels", "colorbar", "colormap_lut",
    "grid", "image_head_grid", "image_panels", "log_mel", "overlay", "save_png", "text_head_grid",
    "text_html", "text_panels", "token_scores",
]
