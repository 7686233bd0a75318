"""From `AttentionMaps` + the raw inputs to per-head pictures: the glue between maps and overlays.

The maps say which keys each head looked at; the geometry inside them says where those
keys sit on the input. Nothing here re-derives patch counts or frame times.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from multimodal.io import AudioClip
from multimodal.overlays import audio_head_grid, image_head_grid, log_mel, save_png, text_head_grid, text_html
from multimodal.types import AttentionMaps, InputError


def query_weights(maps: AttentionMaps, item: int = 0, query: int | None = None) -> torch.Tensor:
    """(Nq,) weights that average a head's rows: one chosen query, or all content queries."""
    valid = maps.content_queries()[item].clone()
    if query is not None:
        if not 0 <= query < valid.numel():
            raise InputError(f"query index {query} is outside 0..{valid.numel() - 1}")
        valid = torch.zeros_like(valid)
        valid[query] = True
    w = valid.float()
    return w / w.sum().clamp_min(1)


def _pool(per_query: torch.Tensor, qw: torch.Tensor) -> np.ndarray:
    """(h, Nq, ...) -> (h, ...) weighted over queries."""
    return torch.einsum("hq...,q->h...", per_query.float(), qw).cpu().numpy()


@dataclass
class Rendered:
    layer: int
    modality: str
    image: Image.Image
    html: str | None = None


def render_layer(maps: AttentionMaps, layer: int, *, image: Image.Image | None = None,
                 audio: AudioClip | None = None, item: int = 0, query: int | None = None,
                 renormalise: bool = True) -> list[Rendered]:
    """One grid per modality among the keys, for one layer of one batch item."""
    qw = query_weights(maps, item, query)
    heads = maps.heads[layer]
    labels = [f"L{layer} H{h}" for h in heads]
    if maps.claimed is not None and layer in maps.claimed:  # competing queries: how much of the keys they won
        claims = _pool(maps.claimed[layer][item], qw)  # (h,)
        labels = [f"{label}, claims {c:.0%}" for label, c in zip(labels, claims)]
    which = "all queries" if query is None else f"query {query}"
    out = []
    if "image" in maps.segments and image is not None:
        m = _pool(maps.image_maps(layer, renormalise)[item], qw)  # (h, gh, gw)
        grid = image_head_grid(np.asarray(image.convert("RGB")), m, labels=labels,
                               title=f"image: layer {layer}, {which}")
        out.append(Rendered(layer, "image", grid))
    if "audio" in maps.segments and audio is not None:
        geom = maps.key_geometry["audio"]
        m = _pool(maps.audio_maps(layer, renormalise)[item], qw)  # (h, T)
        spec, frame_times = log_mel(audio.waveform, audio.sample_rate)
        grid = audio_head_grid(spec, frame_times, m, np.asarray(geom.times), labels=labels,
                               title=f"audio: layer {layer}, {which}")
        out.append(Rendered(layer, "audio", grid))
    if "text" in maps.segments:
        geom = maps.key_geometry["text"]
        m = _pool(maps.text_maps(layer, renormalise)[item], qw)  # (h, N)
        tokens = geom.tokens[item]
        keep = (maps.key_mask & ~maps.key_special)[item, slice(*maps.segments["text"])].cpu().numpy()
        grid = text_head_grid(tokens, m, labels=labels, title=f"text: layer {layer}, {which}", mask=keep)
        html = text_html([t for t, k in zip(tokens, keep) if k], m.mean(0)[keep])
        out.append(Rendered(layer, "text", grid, html))
    return out


def write_all(maps: AttentionMaps, out_dir: str | Path, *, image=None, audio=None, item: int = 0,
              query: int | None = None) -> list[Path]:
    """Every requested layer's grids as PNG (+ HTML for text) and the raw maps (.npz + .json)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = list(maps.save(out_dir / "maps"))
    for layer in maps.layers:
        for r in render_layer(maps, layer, image=image, audio=audio, item=item, query=query):
            path = save_png(r.image, out_dir / f"layer{layer}_{r.modality}.png")
            written.append(path)
            if r.html is not None:
                html_path = path.with_suffix(".html")
                html_path.write_text(r.html)
                written.append(html_path)
    return written
