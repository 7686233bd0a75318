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

from multimodal.analysis.relevance import attention_rollout
from multimodal.io import AudioClip
from multimodal.overlays import audio_head_grid, image_head_grid, log_mel, save_png, text_head_grid, text_html
from multimodal.types import AttentionMaps, AudioGeometry, ImageGeometry, InputError, ModalityTokens, TextGeometry


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


def _pool(per_query: torch.Tensor, qw: torch.Tensor, skip_empty: bool = False) -> np.ndarray:
    """(h, Nq, ...) -> (h, ...) weighted over queries. `skip_empty` (rows renormalised within a modality):
    a query with no mass there (a gradient-relevance row clamped to zero on every key of the modality) is
    left out of the average instead of diluting it, so a pooled panel still sums to 1 when any query has mass."""
    x = per_query.float()
    if not skip_empty:
        return torch.einsum("hq...,q->h...", x, qw).cpu().numpy()
    w = qw * (x.flatten(2).sum(-1) > 0)  # (h, Nq)
    w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("hq...,hq->h...", x, w).cpu().numpy()


@dataclass
class Rendered:
    layer: int
    modality: str
    image: Image.Image
    html: str | None = None


RELEVANCE_LABEL = "grad x attn"  # analysis.relevance.relevance_maps
ROLLOUT_LABEL = "rollout"  # analysis.relevance.fusion_rollout


def _with_extras(m: np.ndarray, labels: list[str], extras: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str], bool]:
    """Heads, then their mean, then the extra panels when given: (maps, labels, whether the grid
    should add a mean itself)."""
    if not extras:
        return m, labels, True
    return (np.concatenate([m, m.mean(0, keepdims=True), *extras.values()]), labels + ["mean", *extras], False)


def render_layer(maps: AttentionMaps, layer: int, *, image: Image.Image | None = None,
                 audio: AudioClip | None = None, item: int = 0, query: int | None = None,
                 renormalise: bool = True, extras: dict[str, AttentionMaps] | None = None) -> list[Rendered]:
    """One grid per modality among the keys, for one layer of one batch item. `extras` (label -> maps
    with one pseudo-head per layer, e.g. `relevance_maps` and `fusion_rollout` of the same run) end
    each grid after the heads' mean, on the same colour scale as the heads (each panel renormalised
    within the modality, as the heads are)."""
    qw = query_weights(maps, item, query)
    extra = {label: m for label, m in (extras or {}).items() if layer in m.weights}

    def panels(per_query) -> tuple[np.ndarray, list[str], bool]:
        """(heads, their mean and the extras, pooled over the chosen queries; labels; add a mean?)"""
        return _with_extras(_pool(per_query(maps)[item], qw, renormalise), labels,
                            {label: _pool(per_query(m)[item], qw, renormalise) for label, m in extra.items()})
    heads = maps.heads[layer]
    labels = [f"L{layer} H{h}" for h in heads]
    if maps.claimed is not None and layer in maps.claimed:  # competing queries: how much of the keys they won
        claims = _pool(maps.claimed[layer][item], qw)  # (h,)
        labels = [f"{label}, claims {c:.0%}" for label, c in zip(labels, claims)]
    which = "all queries" if query is None else f"query {query}"
    out = []
    if "image" in maps.segments and image is not None:
        grid_maps, names, mean = panels(lambda m: m.image_maps(layer, renormalise))  # (h [+1+extras], gh, gw)
        grid = image_head_grid(np.asarray(image.convert("RGB")), grid_maps, labels=names, show_mean=mean,
                               title=f"image: layer {layer}, {which}")
        out.append(Rendered(layer, "image", grid))
    if "audio" in maps.segments and audio is not None:
        geom = maps.key_geometry["audio"]
        grid_maps, names, mean = panels(lambda m: m.audio_maps(layer, renormalise))  # (h [+1+extras], T)
        spec, frame_times = log_mel(audio.waveform, audio.sample_rate)
        grid = audio_head_grid(spec, frame_times, grid_maps, np.asarray(geom.times), labels=names, show_mean=mean,
                               title=f"audio: layer {layer}, {which}")
        out.append(Rendered(layer, "audio", grid))
    if "text" in maps.segments:
        geom = maps.key_geometry["text"]
        grid_maps, names, mean = panels(lambda m: m.text_maps(layer, renormalise))  # (h [+1+extras], N)
        heads_mean = grid_maps[:len(heads)].mean(0)
        tokens = geom.tokens[item]
        keep = (maps.key_mask & ~maps.key_special)[item, slice(*maps.segments["text"])].cpu().numpy()
        grid = text_head_grid(tokens, grid_maps, labels=names, title=f"text: layer {layer}, {which}", mask=keep,
                              show_mean=mean)
        html = text_html([t for t, k in zip(tokens, keep) if k], heads_mean[keep])
        out.append(Rendered(layer, "text", grid, html))
    return out


def write_all(maps: AttentionMaps, out_dir: str | Path, *, image=None, audio=None, item: int = 0,
              query: int | None = None, extras: dict[str, AttentionMaps] | None = None) -> list[Path]:
    """Every requested layer's grids as PNG (+ HTML for text) and the raw maps (.npz + .json); with
    `extras`, each grid ends with those panels (see render_layer)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = list(maps.save(out_dir / "maps"))
    for layer in maps.layers:
        for r in render_layer(maps, layer, image=image, audio=audio, item=item, query=query, extras=extras):
            path = save_png(r.image, out_dir / f"layer{layer}_{r.modality}.png")
            written.append(path)
            if r.html is not None:
                html_path = path.with_suffix(".html")
                html_path.write_text(r.html)
                written.append(html_path)
    return written


# ---------------------------------------------------------------------------------------
# The encoders' own heads: self-attention per layer, and rollout through the encoder
# ---------------------------------------------------------------------------------------

AST_PREFIX = 2  # the audio encoder's captured self-attention: [CLS, distillation, time-major patches]
ENCODER_FROM = ("cls", "mean")  # whose row is drawn: the CLS token's, or the mean over the content tokens


def _encoder_rows(tokens: ModalityTokens, item: int, source: str) -> tuple[torch.Tensor, slice]:
    """(N,) weights over the captured self-attention's rows (queries) and the key slice of the
    content tokens, for one encoder's layout."""
    g = tokens.geometry
    N = tokens.self_attention[0].shape[-1]
    if isinstance(g, TextGeometry):
        content = (tokens.mask & ~tokens.special)[item].cpu()  # (N,)
        cls = 0
        keys = slice(0, N)
    elif isinstance(g, ImageGeometry):
        content = torch.zeros(N, dtype=torch.bool)
        content[g.num_prefix:] = True
        cls = 0 if g.num_prefix else None
        keys = slice(g.num_prefix, N)
    elif isinstance(g, AudioGeometry):
        content = torch.zeros(N, dtype=torch.bool)
        content[AST_PREFIX:] = True
        cls = 0
        keys = slice(AST_PREFIX, N)
    else:
        raise InputError(f"no drawing for the {tokens.modality} encoder's self-attention")
    if source == "cls" and cls is not None:
        rows = torch.zeros(N)
        rows[cls] = 1.0
    else:  # the mean over the content tokens (an encoder without a CLS token, or asked for)
        rows = content.float() / content.sum().clamp_min(1)
    return rows, keys


def render_encoder(tokens: ModalityTokens, *, image: Image.Image | None = None, audio: AudioClip | None = None,
                   item: int = 0, source: str = "cls") -> list[Rendered]:
    """One grid per captured layer of an encoder's self-attention (every head and their mean), and one
    of the attention rollout through all captured layers (Abnar & Zuidema 2020): the row of the CLS
    token (`source="cls"`, where the encoder has one) or the mean row of the content tokens, over the
    content tokens. Text: over the caption's tokens; image: over the patch grid; audio: over the first
    window's time columns (the audio encoder captures its first window only). `Rendered.layer` is
    the layer, or -1 for the rollout."""
    if source not in ENCODER_FROM:
        raise InputError(f"encoder maps are drawn from {' or '.join(ENCODER_FROM)}, not {source!r}")
    if not tokens.self_attention:
        return []
    rows, keys = _encoder_rows(tokens, item, source)
    layers = [a[item].float().cpu() for a in tokens.self_attention]  # each (h, N, N)
    rollout = attention_rollout([a[None] for a in layers])[0][None]  # (1, N, N)
    which = "from CLS" if source == "cls" and rows.max() == 1 else "mean over tokens"
    g, m = tokens.geometry, tokens.modality
    out = []
    for layer, (w, title) in enumerate([(a, f"layer {l}") for l, a in enumerate(layers)] + [(rollout, "rollout")]):
        row = torch.einsum("hqk,q->hk", w, rows)[:, keys]  # (h, N_content)
        labels = [f"L{layer} H{h}" for h in range(row.shape[0])] if title != "rollout" else ["rollout, all layers"]
        heading = f"{m} encoder self-attention: {title}, {which}"
        if isinstance(g, ImageGeometry) and image is not None:
            gh, gw = g.grid
            grid_maps = row.reshape(-1, gh, gw).numpy()
            picture = image_head_grid(np.asarray(image.convert("RGB")), grid_maps, labels=labels, title=heading)
        elif isinstance(g, AudioGeometry) and audio is not None:
            T = row.shape[1] // g.freq_bins  # the first window's columns
            per_column = row.reshape(-1, T, g.freq_bins).sum(-1).numpy()  # (h, T)
            spec, frame_times = log_mel(audio.waveform, audio.sample_rate)
            picture = audio_head_grid(spec, frame_times, per_column, np.asarray(g.times[:T]), labels=labels,
                                      title=heading + " (first window)")
        elif isinstance(g, TextGeometry):
            keep = (tokens.mask & ~tokens.special)[item].cpu().numpy()
            picture = text_head_grid(g.tokens[item], row.numpy(), labels=labels, title=heading, mask=keep)
        else:
            continue
        out.append(Rendered(layer if title != "rollout" else -1, f"encoder_{m}", picture))
    return out


def write_encoder_maps(tokens: dict[str, ModalityTokens], out_dir: str | Path, *, image=None, audio=None,
                       item: int = 0, source: str = "cls") -> list[Path]:
    """`encoder_<modality>_layer<l>.png` per captured layer and `encoder_<modality>_rollout.png`."""
    out_dir = Path(out_dir)
    written = []
    for m, t in tokens.items():
        for r in render_encoder(t, image=image, audio=audio, item=item, source=source):
            name = f"{r.modality}_{'rollout' if r.layer < 0 else f'layer{r.layer}'}.png"
            written.append(save_png(r.image, out_dir / name))
    return written
