"""The numbers runs are compared by, named in one place: `summarise` writes a run's flat summary
(`done.json`'s "summary") and the report reads it back through the same key helpers and the
`Metric` tables below (key, label, format), with `value` resolving a key from the summary, the
timings or the per-head tables. Keeps to numpy, so the report side needs no torch of its own.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NamedTuple, Sequence

import numpy as np

MODALITIES = ("image", "audio")  # the perceptual modalities grounding is measured on
BASELINE_SOURCES = ("uniform", "random_init")  # grounding baselines: a uniform map, the untrained model
HEAD_GROUNDING = ("pointing", "energy", "energy_gain")  # per-head grounding, one key per modality
HEAD_MEANS = ("entropy", "scaled_confidence", "share_text", "share_image", "share_audio", "spread_px", "spread_s")


def pointing_best(mod: str) -> str:
    """Summary key: the best head's pointing-game accuracy on one modality."""
    return f"pointing_{mod}_best"


def baseline_pointing_best(source: str, mod: str) -> str:
    """Summary key: best-'head' pointing of a grounding baseline (`BASELINE_SOURCES`)."""
    return f"{source}_pointing_{mod}_best"


def head_grounding(metric: str, mod: str) -> str:
    """Per-head key: one of `HEAD_GROUNDING` on one modality, e.g. "pointing_image"."""
    return f"{metric}_{mod}"


class Metric(NamedTuple):
    key: str
    label: str
    fmt: str = ".3f"


# the per-grid-point table and the conclusions (size_lines and plot_size take the first entries by position)
METRICS = [
    Metric("matching_accuracy", "matching accuracy", ".3f"),
    Metric(pointing_best("image"), "best-head pointing (image)", ".3f"),
    Metric(pointing_best("audio"), "best-head pointing (audio)", ".3f"),
    Metric("energy_gain_image_mean", "mean energy gain (image)", ".2f"),
    Metric("energy_gain_audio_mean", "mean energy gain (audio)", ".2f"),
    Metric("entropy_mean", "mean normalised entropy", ".3f"),
    Metric("js_distance_mean", "mean sqrt-JS distance between heads", ".3f"),
    Metric("modality_focus_mean", "mean image-vs-audio focus per head", ".3f"),
    Metric("image_led_fraction", "fraction of heads led by image", ".2f"),
    Metric("shapley_top_share", "top head's share of Shapley mass", ".2f"),
]
TIMING = [Metric("train_s", "train s", ".0f"), Metric("eval_s", "eval s", ".1f"),
          Metric("fusion_pass_s", "fusion pass s", ".3f")]  # keys of a run's "timing"
DYNAMICS = [Metric("matching_accuracy", "matching accuracy"),
            Metric(pointing_best("image"), "best-head pointing (image)"),
            Metric(pointing_best("audio"), "best-head pointing (audio)"),
            Metric("entropy_mean", "mean normalised entropy"),
            Metric("scaled_confidence_mean", "mean scaled confidence"),
            Metric("js_distance_mean", "mean sqrt-JS distance")]  # over the training snapshots (tables: ".3f")
HEAD_COLUMNS = [Metric("entropy", "entropy", ".3f"), Metric("scaled_confidence", "N*max", ".1f"),
                Metric("share_text", "text share", ".2f"), Metric("share_image", "image share", ".2f"),
                Metric("share_audio", "audio share", ".2f"), Metric("spread_px", "spread px", ".1f"),
                Metric("spread_s", "spread s", ".2f"),
                Metric(head_grounding("pointing", "image"), "pointing img", ".3f"),
                Metric(head_grounding("energy_gain", "image"), "energy gain img", ".2f"),
                Metric(head_grounding("pointing", "audio"), "pointing aud", ".3f"),
                Metric(head_grounding("energy_gain", "audio"), "energy gain aud", ".2f"),
                Metric("ablation", "ablation", "+.3f"), Metric("gradient_normalised", "gradient (norm.)", ".2f")]
HEATMAPS = [Metric("entropy", "entropy"), Metric("scaled_confidence", "scaled confidence (N*max)"),
            Metric("share_text", "text share"), Metric("share_image", "image share"),
            Metric("share_audio", "audio share"), Metric(head_grounding("pointing", "image"), "pointing (image)"),
            Metric(head_grounding("pointing", "audio"), "pointing (audio)"), Metric("shapley", "Shapley value")]


# ---------------------------------------------------------------------------------------
# Writing: one run's summary
# ---------------------------------------------------------------------------------------


def _nanmean(values) -> float | None:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


def summarise(result: dict) -> dict:
    """The flat numbers one run is compared by (None where a metric does not apply)."""
    heads = result["heads"]
    s = {"matching_accuracy": result["matching"].get("all", {}).get("accuracy")}
    g = result["grounding"] or {"summary": {}, "baselines": {}}
    for mod in MODALITIES:
        gm = g["summary"].get(mod)
        s[pointing_best(mod)] = gm["best_pointing"] if gm else None
        s[f"energy_{mod}_mean"] = gm["mean_energy"] if gm else None
        s[f"energy_gain_{mod}_mean"] = gm["mean_energy_gain"] if gm else None
        for src in BASELINE_SOURCES:
            b = g["baselines"].get(mod, {}).get(src)
            s[baseline_pointing_best(src, mod)] = b["best_pointing"] if b else None
    for k in HEAD_MEANS:
        s[f"{k}_mean"] = _nanmean(r.get(k) for r in heads)
    red = result["redundancy"]
    s["js_distance_mean"] = None if math.isnan(red["mean_distance"]) else red["mean_distance"]
    s["redundant_clusters"] = sum(1 for c in red["clusters"] if len(c) > 1)
    if result["importance"]:
        phi = np.array([abs(r["shapley"]) for r in heads])
        s["margin_all_heads"] = result["importance"]["margin_all_heads"]
        s["margin_no_heads"] = result["importance"]["margin_no_heads"]
        s["shapley_top_share"] = float(phi.max() / phi.sum()) if phi.sum() > 0 else None
    return s


# ---------------------------------------------------------------------------------------
# Reading: a metric of one run, the runs of one grid point
# ---------------------------------------------------------------------------------------


SIZE_SPREAD = 1.5  # the model-size section needs the largest fusion block at least this many times the smallest


def sizes_differ(params: set[int]) -> bool:
    """Do these fusion parameter counts span a real size range (e.g. not 2,048 latent parameters on 530k)?"""
    return bool(params) and max(params) >= SIZE_SPREAD * min(params)


def _perceptual_shares(heads: list[dict]) -> list[tuple[float, float]]:
    """(image, audio) share of every head that has both, renormalised to sum to 1 (text keys left out,
    so text-token queries, which see no text keys, and latents, which do, compare on the same scale)."""
    pairs = [(h.get("share_image"), h.get("share_audio")) for h in heads]
    return [(i / (i + a), a / (i + a)) for i, a in pairs if i is not None and a is not None and i + a > 0]


def modality_focus(heads: list[dict]) -> float | None:
    """Mean over heads of |image share - audio share| (renormalised): 0 = every head splits its
    perceptual mass evenly, 1 = every head looks at one modality only."""
    shares = _perceptual_shares(heads)
    return float(np.mean([abs(i - a) for i, a in shares])) if shares else None


def image_led_fraction(heads: list[dict]) -> float | None:
    """Fraction of heads with more mass on image keys than on audio keys (0.5 = an even split of heads)."""
    shares = _perceptual_shares(heads)
    return float(np.mean([i > a for i, a in shares])) if shares else None


DERIVED = {"modality_focus_mean": modality_focus, "image_led_fraction": image_led_fraction}  # from the head tables


def value(run: dict, key: str) -> float | None:
    """One metric of one run: derived from its heads, from its summary, or from its timings."""
    if key in DERIVED:
        v = DERIVED[key](run.get("heads") or [])
    elif key in run["summary"]:
        v = run["summary"][key]
    else:
        v = run.get("timing", {}).get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    v = [x for x in values if x is not None]
    if not v:
        return math.nan, math.nan, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v)


class Group:
    """The runs of one grid point (they differ only by seed)."""

    def __init__(self, label: str, point: dict, runs: list[dict]):
        self.label, self.point, self.runs = label, point, runs

    def values(self, key: str) -> list[float | None]:
        return [value(r, key) for r in self.runs]

    @property
    def fusion_params(self) -> int:
        return int(self.runs[0]["fusion_params"])


def group_runs(results: list[dict]) -> list[Group]:
    groups: dict[str, Group] = {}
    for r in results:
        groups.setdefault(r["group"], Group(r["group"], r["point"], [])).runs.append(r)
    return list(groups.values())


def snapshot_series(runs: list[dict], key: str) -> dict[int, list[float]]:
    """Training step -> the runs' values of one summary metric at that snapshot (missing ones left out)."""
    by_step = defaultdict(list)
    for r in runs:
        for s in r.get("snapshots", []):
            if s["summary"].get(key) is not None:
                by_step[s["step"]].append(s["summary"][key])
    return by_step
