"""Scoring maps against ground truth (docs/metrics.md section 5). Pure functions over tensors.

Image maps are `(N, gh, gw)` over the patch grid, ground truth is `(N, H, W)` masks at
image resolution. Audio maps are `(N, T)` over time columns with centres `times (T,)`.

`score_phrase` / `phrase_grounding` are THE per-phrase grounding definition: `multimodal eval`
(`evaluate.ground_batch`) and the app's metrics table (`app.session.grounding_scores`) both
call them, so the page and the published numbers agree on the same scene. A phrase's map is
the mean, over the content text tokens its character span covers, of each head's rows
renormalised within the modality. Objects: pointing game at the mask's resolution (the
image's; no downscaling) with POINTING_TOLERANCE_PX (tolerant) and on the mask itself (strict),
energy inside the mask, and that energy over the mask's area fraction. Events: temporal
pointing with a tolerance of TIME_TOLERANCE_COLUMNS time-column spacings (tolerant) and inside
the interval (strict), mass inside the interval over the valid columns (validity from the key
mask), and that mass over chance. Both pointing readings come from the same peak.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from multimodal.types import AttentionMaps

POINTING_TOLERANCE_PX = 15  # TorchRay's pointing game
TIME_TOLERANCE_COLUMNS = 1.0  # temporal pointing tolerance, in time-column spacings
# what score_phrase returns per head: pointing with the tolerance (TOLERANT) and without (STRICT: the peak
# inside the mask / the peak column's centre inside the event), from the same peak; energy; energy over chance
METRICS = ("pointing", "pointing_strict", "energy", "energy_gain")


def upsample_map(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, gh, gw) -> (N, H, W), bilinear, non-negative."""
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)  # (N, 1, H, W)
    return up[:, 0].clamp_min(0)


def _dilate(masks: Tensor, radius: int) -> Tensor:
    """(N, H, W) bool -> pixels within `radius` px (Euclidean) of a mask pixel."""
    if radius <= 0:
        return masks.bool()
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).float()[None, None]  # (1, 1, k, k)
    hit = F.conv2d(masks[:, None].float(), disk, padding=radius)  # (N, 1, H, W)
    return hit[:, 0] > 0.5


def _argmax_random_ties(a: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(N, K) -> (N,) index of each row's maximum, ties broken at random (a uniform map does not
    "point" at its first entry)."""
    top = a.amax(1, keepdim=True)
    ties = a >= top - 1e-7 * top.abs().clamp_min(1e-12)  # (N, K)
    noise = torch.rand(a.shape, generator=generator)
    return torch.where(ties, noise, torch.full_like(noise, -1.0)).argmax(1)


def image_peak(maps: Tensor, size: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """(N, gh, gw) -> (N,) flat pixel index of each map's maximum at image resolution `size`."""
    return _argmax_random_ties(upsample_map(maps, size).flatten(1), generator)


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = POINTING_TOLERANCE_PX,
                  generator: torch.Generator | None = None) -> Tensor:
    """(N,) bool hits: the map's maximum at image resolution lies within `tolerance` px of the mask
    (0: on a mask pixel). Ties are broken at random."""
    return _near_mask(masks, image_peak(maps, tuple(masks.shape[-2:]), generator), tolerance)


def _near_mask(masks: Tensor, idx: Tensor, radius: int) -> Tensor:
    """(N,) bool: a mask pixel lies within `radius` px (Euclidean) of flat pixel `idx (N,)`.

    The same as `_dilate(masks, radius).flatten(1).gather(1, idx)`, looking only at the disk
    around each peak: a 1024 px image costs what a 128 px one does.
    """
    masks = masks.bool()
    N, H, W = masks.shape
    if radius <= 0:
        return masks.flatten(1).gather(1, idx[:, None])[:, 0]
    r = torch.arange(-radius, radius + 1)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    disk = (dy ** 2 + dx ** 2) <= radius ** 2
    dy, dx = dy[disk], dx[disk]  # (K,)
    y = (idx // W)[:, None] + dy[None]  # (N, K)
    x = (idx % W)[:, None] + dx[None]
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    hit = masks[torch.arange(N)[:, None], y.clamp(0, H - 1), x.clamp(0, W - 1)] & inside  # (N, K)
    return hit.any(1)


def energy_inside(maps: Tensor, masks: Tensor) -> Tensor:
    """(N,) share of the (non-negative, upsampled) map's energy that falls inside the mask."""
    up = upsample_map(maps, tuple(masks.shape[-2:]))  # (N, H, W)
    total = up.flatten(1).sum(1)
    inside = (up * masks.float()).flatten(1).sum(1)
    return inside / total.clamp_min(1e-12)


def region_fraction(masks: Tensor) -> Tensor:
    """(N,) the uniform map's energy inside each mask = mask area / image area."""
    return masks.flatten(1).float().mean(1)


def interval_mass(maps: Tensor, times: Tensor, intervals: Tensor, valid: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """(mass, chance), each (N,): share of the map on time columns whose centre is in [t0, t1].

    `valid (N, T)` excludes padding columns before renormalising; chance = |I| / T_valid
    counted in columns, so `mass / chance` is the gain over a uniform map.
    """
    a = maps.float().clamp_min(0)
    if valid is None:
        valid = torch.ones_like(a, dtype=torch.bool)
    a = a * valid
    t = times.float()[None, :]  # (1, T)
    inside = (t >= intervals[:, :1]) & (t <= intervals[:, 1:2]) & valid  # (N, T)
    mass = (a * inside).sum(1) / a.sum(1).clamp_min(1e-12)
    chance = inside.sum(1).float() / valid.sum(1).clamp_min(1).float()
    return mass, chance


def temporal_peak(maps: Tensor, times: Tensor, valid: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """(N, T) -> (N,) centre time of each map's peak column among the valid ones (random tie-break)."""
    a = maps.float()
    if valid is not None:
        a = a.masked_fill(~valid, float("-inf"))
    return times.float()[_argmax_random_ties(a, generator)]


def temporal_pointing(maps: Tensor, times: Tensor, intervals: Tensor, tolerance: float,
                      valid: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """(N,) bool: the map's peak column centre lies in [t0 - tol, t1 + tol] (random tie-break)."""
    peak = temporal_peak(maps, times, valid, generator)
    return (peak >= intervals[:, 0] - tolerance) & (peak <= intervals[:, 1] + tolerance)


# ---------------------------------------------------------------------------------------
# The one per-phrase grounding definition (eval and app)
# ---------------------------------------------------------------------------------------


def phrase_tokens(maps: "AttentionMaps", item: int, span: Sequence[int]) -> Tensor:
    """(Nq,) bool: content text queries (real, not CLS/SEP, non-empty character span) whose
    characters overlap the phrase's span [s, e)."""
    a, b = (int(v) for v in span)
    sel = [(s < b and e > a and e > s) for s, e in maps.query_geometry.spans[item]]
    q = torch.tensor(sel, dtype=torch.bool) & maps.content_queries()[item].cpu()
    return q


def phrase_map(per_query: Tensor, q: Tensor) -> Tensor:
    """(h, Nq, ...) -> (h, ...): the mean over the phrase's queries `q (Nq,) bool`."""
    return per_query[:, q].mean(1)


def audio_columns(maps: "AttentionMaps") -> tuple[Tensor, Tensor]:
    """(times (T,), valid (B, T)): time-column centres, and which columns are real keys for
    each item (from the key mask: padding columns of a shorter clip are not)."""
    geom = maps.key_geometry["audio"]
    times = torch.tensor(geom.times)  # (T,)
    start = maps.segments["audio"][0] + geom.num_prefix
    T, F_ = len(geom.times), geom.freq_bins
    valid = maps.key_mask[:, start:start + T * F_].reshape(-1, T, F_)[..., 0].cpu()  # (B, T)
    return times, valid


def column_spacing(times: Tensor) -> float:
    """Seconds between time-column centres (0.1 s for a single column)."""
    return float(times[1] - times[0]) if len(times) > 1 else 0.1


def score_object(m: Tensor, mask: Tensor, generator: torch.Generator | None = None,
                 tolerance: int = POINTING_TOLERANCE_PX) -> dict[str, Tensor]:
    """One object phrase, per head: `m (h, gh, gw)`, `mask (H, W)` bool at image resolution ->
    {"pointing": (h,) bool within `tolerance` px, "pointing_strict": (h,) bool on the mask (the same
    peak), "energy": (h,), "energy_gain": (h,) energy / area fraction}."""
    masks = mask.bool()[None].expand(m.shape[0], -1, -1)  # (h, H, W)
    peak = image_peak(m, tuple(masks.shape[-2:]), generator)  # (h,)
    energy = energy_inside(m, masks)
    base = region_fraction(masks[:1]).item()
    return {"pointing": _near_mask(masks, peak, tolerance), "pointing_strict": _near_mask(masks, peak, 0),
            "energy": energy, "energy_gain": energy / max(base, 1e-9)}


def score_event(m: Tensor, times: Tensor, interval: Sequence[float], valid: Tensor | None = None,
                generator: torch.Generator | None = None,
                tolerance_columns: float = TIME_TOLERANCE_COLUMNS) -> dict[str, Tensor]:
    """One event phrase, per head: `m (h, T)`, `interval (start, end)` seconds, `valid (T,)` ->
    {"pointing": (h,) bool, "pointing_strict": (h,) bool, "energy": (h,) mass in the interval,
    "energy_gain": (h,) mass / chance}.

    Pointing is a hit when the peak column's centre lies within `tolerance_columns` column
    spacings of the interval (a peak exactly one column outside counts at the default);
    strict pointing when it lies inside the interval (the same peak)."""
    h = m.shape[0]
    intervals = torch.tensor([[float(interval[0]), float(interval[1])]]).expand(h, -1)  # (h, 2)
    valid = None if valid is None else valid.bool()[None].expand(h, -1)  # (h, T)
    peak = temporal_peak(m, times, valid, generator)  # (h,)
    tol = tolerance_columns * column_spacing(times)
    mass, chance = interval_mass(m, times, intervals, valid)
    return {"pointing": (peak >= intervals[:, 0] - tol) & (peak <= intervals[:, 1] + tol),
            "pointing_strict": (peak >= intervals[:, 0]) & (peak <= intervals[:, 1]),
            "energy": mass, "energy_gain": mass / chance.clamp_min(1e-9)}


def score_phrase(per_modality: Mapping[str, Tensor], q: Tensor, phrase: Mapping, object_masks: Sequence | None,
                 events: Sequence[Sequence[float]], times: Tensor | None = None, valid: Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[str, dict[str, Tensor]] | None:
    """One phrase of one item at one layer -> ("image" | "audio", {metric: (h,)}), or None when
    it cannot be scored (no such modality, no object masks, an empty mask, no tokens).

    `per_modality["image"]` is `(h, Nq, gh, gw)` and `["audio"]` `(h, Nq, T)` (one item's
    renormalised maps); `phrase` is {"span", "target": "object" | "event", "index"};
    `object_masks[k]` is object k's (H, W) bool mask at image resolution; `events[k]` is
    (start, end) seconds; `times (T,)` and `valid (T,)` as from `audio_columns`.
    """
    if not bool(q.any()):
        return None
    index = int(phrase["index"])
    if phrase["target"] == "object" and "image" in per_modality and object_masks is not None:
        mask = object_masks[index]
        mask = mask if isinstance(mask, Tensor) else torch.from_numpy(np.asarray(mask, dtype=bool))
        if not bool(mask.any()):
            return None  # nothing to point at (e.g. a box outside the image)
        return "image", score_object(phrase_map(per_modality["image"], q), mask, generator)
    if phrase["target"] == "event" and "audio" in per_modality and times is not None:
        start, end = events[index][:2]
        return "audio", score_event(phrase_map(per_modality["audio"], q), times, (start, end), valid, generator)
    return None


def phrase_grounding(maps: "AttentionMaps", layer: int, item: int, phrases: Sequence[Mapping],
                     object_masks: Sequence | None, events: Sequence[Sequence[float]],
                     generator: torch.Generator | None = None,
                     per_modality: Mapping[str, Tensor] | None = None) -> list[dict]:
    """Every scorable phrase of item `item` at `layer`, in order: [{"phrase", "modality",
    "pointing", "pointing_strict", "energy", "energy_gain"}], each metric `(h,)` over the layer's heads.

    `per_modality` overrides the maps scored (`(B, h, Nq, ...)` per modality, e.g. a uniform
    baseline); by default each head's rows renormalised within the image / the audio.
    """
    if per_modality is None:
        per_modality = {}
        if "image" in maps.segments:
            per_modality["image"] = maps.image_maps(layer, renormalise=True).cpu()
        if "audio" in maps.segments:
            per_modality["audio"] = maps.audio_maps(layer, renormalise=True).cpu()
    one = {m: t[item] for m, t in per_modality.items()}
    times, valid = audio_columns(maps) if "audio" in maps.segments else (None, None)
    out = []
    for p in phrases:
        scored = score_phrase(one, phrase_tokens(maps, item, p["span"]), p, object_masks, events, times,
                              None if valid is None else valid[item], generator)
        if scored is not None:
            out.append({"phrase": p, "modality": scored[0], **scored[1]})
    return out
