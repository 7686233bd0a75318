"""Attention over time drawn on a log-mel spectrogram: a coloured band plus a weight curve."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from multimodal.io import SAMPLE_RATE, resample
from multimodal.overlays.common import (
    INK,
    TICK_SIZE,
    colorbar,
    colormap_lut,
    font,
    grid,
    head_labels,
    nice_ticks,
    normalise,
    to_index,
    value_range,
)

N_FFT = 400  # 25 ms window at 16 kHz
N_MELS = 64
HOP_SECONDS = 0.01
TOP_DB = 80.0  # dynamic range kept in the spectrogram

CURVE = (0, 225, 255)  # cyan: absent from inferno and from the grey spectrogram
CURVE_SHADOW = (0, 0, 0)
AXIS_H = 18  # px under each panel for the time ticks


@lru_cache(maxsize=8)
def _mel_transforms(n_mels: int, hop: int, n_fft: int):
    import torch
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=n_fft, hop_length=hop, n_mels=n_mels, power=2.0)
    to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=TOP_DB)
    return torch.nn.Sequential(mel, to_db).eval()


def log_mel(waveform: np.ndarray, sample_rate: int, n_mels: int = N_MELS,
            hop_seconds: float = HOP_SECONDS) -> tuple[np.ndarray, np.ndarray]:
    """(n,) waveform -> (spec_db (n_mels, frames) float32, frame_times (frames,) seconds).

    Resampled to 16 kHz first; a (channels, n) or (n, channels) input is mixed to mono.
    Frame i is centred at i * hop (torch.stft center=True).
    """
    import torch

    w = torch.as_tensor(np.asarray(waveform), dtype=torch.float32)
    if w.ndim == 2:
        w = w.mean(dim=int(w.shape[0] > w.shape[1]))  # average the shorter (channel) axis
    if w.ndim != 1:
        raise ValueError(f"waveform must be (n,) or (channels, n), got shape {tuple(w.shape)}")
    w = resample(w, sample_rate)
    hop = max(1, round(hop_seconds * SAMPLE_RATE))
    n_fft = max(N_FFT, hop)
    if w.numel() <= n_fft // 2:  # reflect padding needs more samples than half a window
        w = torch.nn.functional.pad(w, (0, n_fft // 2 + 1 - w.numel()))
    with torch.no_grad():
        spec = _mel_transforms(n_mels, hop, n_fft)(w)  # (n_mels, frames)
    spec = spec.numpy().astype(np.float32)
    frame_times = np.arange(spec.shape[1], dtype=np.float64) * hop / SAMPLE_RATE
    return spec, frame_times


def _spectrogram_rgb(spec_db: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(n_mels, frames) dB -> (h, w, 3) uint8 grey, low frequencies at the bottom."""
    w, h = size
    spec = np.asarray(spec_db, dtype=np.float32)
    hi = float(np.nanmax(spec))
    lo = max(float(np.nanmin(spec)), hi - TOP_DB)
    grey = normalise(np.flipud(spec), lo, hi)  # row 0 = highest mel band
    grey = Image.fromarray(np.ascontiguousarray(grey)).resize((w, h), Image.BILINEAR)
    g = (np.asarray(grey, np.float32) * 215 + 15 + 0.5).astype(np.uint8)  # keep off pure black/white
    return np.repeat(g[..., None], 3, axis=2)


def _time_axis(draw: ImageDraw.ImageDraw, y: int, width: int, t0: float, t1: float) -> None:
    """Ticks in seconds along the panel's bottom edge (y), labels below."""
    ticks, decimals = nice_ticks(t0, t1, target=max(3, width // 70))
    tf = font(TICK_SIZE - 1)
    for t in ticks:
        x = int(round((t - t0) / (t1 - t0) * (width - 1)))
        draw.line((x, y, x, y + 3), fill=INK)
        text = f"{t:.{decimals}f}" + ("s" if t == ticks[-1] else "")
        anchor = "lt" if x < 8 else ("rt" if x > width - 12 else "mt")
        draw.text((x, y + 4), text, fill=INK, font=tf, anchor=anchor)


def audio_panels(spec_db: np.ndarray, frame_times: np.ndarray, maps: np.ndarray, map_times: np.ndarray,
                 cmap: str = "inferno", panel_size: tuple[int, int] = (360, 110),
                 shared_scale: bool = True) -> tuple[list[Image.Image], Image.Image]:
    """One spectrogram panel per row of maps (k, T), and the legend. See audio_head_grid."""
    W, H = panel_size
    band_h = max(8, H // 8)
    spec_h = H - band_h - 1
    hop = float(np.median(np.diff(frame_times))) if frame_times.size > 1 else HOP_SECONDS
    t0, t1 = frame_times[0] - hop / 2, frame_times[-1] + hop / 2  # each frame spans one hop
    px_times = t0 + (np.arange(W) + 0.5) / W * (t1 - t0)  # (W,) time at each pixel column

    # Everything shared by the heads is drawn once: spectrogram, separator, time axis.
    base = Image.new("RGB", (W, H + AXIS_H), (255, 255, 255))
    base.paste(Image.fromarray(_spectrogram_rgb(spec_db, (W, spec_h))), (0, 0))
    draw = ImageDraw.Draw(base)
    draw.line((0, spec_h, W, spec_h), fill=(255, 255, 255))
    _time_axis(draw, H, W, t0, t1)

    weights = np.stack([np.interp(px_times, map_times, m) for m in maps])  # (k, W)
    if shared_scale:
        vmin, vmax = value_range(maps)
        legend = colorbar(H, vmin, vmax, cmap, "attention")
    else:
        legend = colorbar(H, 0.0, 1.0, cmap, "fraction of\npanel max")

    lut = colormap_lut(cmap)
    xs = np.arange(W, dtype=np.float32)
    panels = []
    for w in weights:
        lo, hi = (vmin, vmax) if shared_scale else value_range(w)
        v = normalise(w, lo, hi)  # (W,)
        band = np.repeat(lut[to_index(v)][None], band_h, axis=0)  # (band_h, W, 3)
        panel = base.copy()
        panel.paste(Image.fromarray(band), (0, spec_h + 1))
        ys = (spec_h - 3) - v * (spec_h - 8)  # (W,) top of the panel = the scale's max
        points = list(zip(xs.tolist(), ys.tolist()))
        pd = ImageDraw.Draw(panel)
        pd.line(points, fill=CURVE_SHADOW, width=4, joint="curve")
        pd.line(points, fill=CURVE, width=2, joint="curve")
        panels.append(panel)
    return panels, legend


def audio_head_grid(spec_db: np.ndarray, frame_times: np.ndarray, maps: np.ndarray,
                    map_times: np.ndarray, labels: list[str] | None = None, title: str | None = None,
                    cmap: str = "inferno", show_mean: bool = True,
                    panel_size: tuple[int, int] = (360, 110), cols: int | None = None,
                    shared_scale: bool = True) -> Image.Image:
    """Per head: the grey log-mel spectrogram with the head's weight over time as a coloured
    band along the bottom and a cyan curve on top; time ticks in seconds; one legend.
    With 2+ heads a "mean" panel (the head average) comes last when show_mean.

    maps is (heads, T) with map_times (T,) the centre of each time column in seconds;
    weights are interpolated linearly between centres. panel_size (w, h) is the
    spectrogram + band area; the time axis is added below it.
    """
    spec_db = np.asarray(spec_db, dtype=np.float32)
    frame_times = np.asarray(frame_times, dtype=np.float64).reshape(-1)
    map_times = np.asarray(map_times, dtype=np.float64).reshape(-1)
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim == 1:
        maps = maps[None]
    if spec_db.ndim != 2 or spec_db.shape[1] != frame_times.shape[0]:
        raise ValueError(f"spec_db {spec_db.shape} must be (n_mels, {frame_times.shape[0]} frames)")
    if maps.ndim != 2 or maps.shape[1] != map_times.shape[0]:
        raise ValueError(f"maps must be (heads, {map_times.shape[0]}), got shape {maps.shape}")
    show_mean = show_mean and maps.shape[0] > 1  # the mean of one head is that head
    labels = head_labels(labels, maps.shape[0], show_mean)
    if show_mean:
        maps = np.concatenate([maps, maps.mean(0, keepdims=True)], axis=0)  # (h+1, T)
    panels, legend = audio_panels(spec_db, frame_times, maps, map_times, cmap, panel_size, shared_scale)
    if cols is None:
        cols = 1 if len(panels) <= 3 else 2
    return grid(panels, labels, cols, title, legend)
