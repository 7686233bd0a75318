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
HEAD_GROUNDING = ("pointing", "pointing_strict", "energy", "energy_gain")  # per-head grounding, one key per modality
HEAD_MEANS = ("entropy", "scaled_confidence", "share_text", "share_image", "share_audio", "spread_px", "spread_s")


def pointing_best(mod: str) -> str:
    """Summary key: the best head's pointing-game accuracy on one modality."""
    return f"pointing_{mod}_best"


def pointing_best_strict(mod: str) -> str:
    """Summary key: the best head's STRICT pointing on one modality (the peak on the object / in the event)."""
    return f"pointing_{mod}_best_strict"


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


# the per-grid-point table and the conclusions; strict pointing first (targets are set on it), the tolerant
# reading beside it
METRICS = [
    Metric("matching_accuracy", "matching accuracy", ".3f"),
    Metric(pointing_best_strict("image"), "best-head strict pointing (image)", ".3f"),
    Metric(pointing_best_strict("audio"), "best-head strict pointing (audio)", ".3f"),
    Metric(pointing_best("image"), "best-head pointing (image)", ".3f"),
    Metric(pointing_best("audio"), "best-head pointing (audio)", ".3f"),
    Metric("energy_gain_image_mean", "mean energy gain (image)", ".2f"),
    Metric("energy_gain_audio_mean", "mean energy gain (audio)", ".2f"),
    Metric("entropy_mean", "mean normalised entropy", ".3f"),
    Metric("js_distance_mean", "mean sqrt-JS distance between heads", ".3f"),
    Metric("modality_focus_mean", "mean |image focus| per head (vs uniform)", ".3f"),
    Metric("image_led_fraction", "fraction of heads above uniform on image", ".2f"),
    Metric("shapley_top_share", "top head's share of Shapley mass", ".2f"),
]
# what a model does (match a caption, point at the referent): compared between levels over every run, grounded
# or not, so a level that fails to ground shows it. The rest of METRICS describe how its heads specialise and are
# compared only between runs that both ground (`grounds`)
OUTCOME_METRICS = frozenset(["matching_accuracy"] + [k for m in MODALITIES for k in (
    pointing_best_strict(m), pointing_best(m), f"energy_gain_{m}_mean")])
SIZE_METRICS = ("matching_accuracy", pointing_best_strict("image"), pointing_best_strict("audio"),
                "entropy_mean")  # against the fusion block's parameter count (size_lines, plot_size)
TIMING = [Metric("train_s", "train s", ".0f"), Metric("eval_s", "eval s", ".1f"),
          Metric("fusion_pass_s", "fusion pass s", ".3f")]  # keys of a run's "timing"
DYNAMICS = [Metric("matching_accuracy", "matching accuracy"),
            Metric(pointing_best_strict("image"), "best-head strict pointing (image)"),
            Metric(pointing_best_strict("audio"), "best-head strict pointing (audio)"),
            Metric(pointing_best("image"), "best-head pointing (image)"),
            Metric(pointing_best("audio"), "best-head pointing (audio)"),
            Metric("entropy_mean", "mean normalised entropy"),
            Metric("scaled_confidence_mean", "mean scaled confidence"),
            Metric("js_distance_mean", "mean sqrt-JS distance")]  # over the training snapshots (tables: ".3f")
HEAD_COLUMNS = [Metric("entropy", "entropy", ".3f"), Metric("scaled_confidence", "N*max", ".1f"),
                Metric("share_text", "text share", ".2f"), Metric("share_image", "image share", ".2f"),
                Metric("share_audio", "audio share", ".2f"), Metric("spread_px", "spread px", ".1f"),
                Metric("spread_s", "spread s", ".2f"),
                Metric(head_grounding("pointing_strict", "image"), "strict pointing img", ".3f"),
                Metric(head_grounding("pointing", "image"), "pointing img", ".3f"),
                Metric(head_grounding("energy_gain", "image"), "energy gain img", ".2f"),
                Metric(head_grounding("pointing_strict", "audio"), "strict pointing aud", ".3f"),
                Metric(head_grounding("pointing", "audio"), "pointing aud", ".3f"),
                Metric(head_grounding("energy_gain", "audio"), "energy gain aud", ".2f"),
                Metric("ablation", "ablation", "+.3f"), Metric("gradient_normalised", "gradient (norm.)", ".2f")]
HEATMAPS = [Metric("entropy", "entropy"), Metric("scaled_confidence", "scaled confidence (N*max)"),
            Metric("share_text", "text share"), Metric("share_image", "image share"),
            Metric("share_audio", "audio share"), Metric(head_grounding("pointing_strict", "image"), "strict pointing (image)"),
            Metric(head_grounding("pointing_strict", "audio"), "strict pointing (audio)"), Metric("shapley", "Shapley value")]


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
        s[pointing_best_strict(mod)] = gm.get("best_pointing_strict") if gm else None
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


def _renormalised(image: float | None, audio: float | None) -> float | None:
    """image / (image + audio): the image part of the perceptual mass (text keys left out, so text-token
    queries, which see no text keys, and latents, which do, compare on the same scale)."""
    if image is None or audio is None or image + audio <= 0:
        return None
    return image / (image + audio)


def image_focus(head: dict) -> float | None:
    """A head's image share (renormalised over image + audio) minus a uniform head's with the same key
    counts: 0 for a uniform head, > 0 leaning to the image, < 0 to the audio. None for heads measured
    before the uniform shares were recorded, or without both modalities."""
    share = _renormalised(head.get("share_image"), head.get("share_audio"))
    chance = _renormalised(head.get("uniform_share_image"), head.get("uniform_share_audio"))
    return None if share is None or chance is None else share - chance


def _focuses(heads: list[dict]) -> list[float]:
    return [f for f in map(image_focus, heads) if f is not None]


def modality_focus(heads: list[dict]) -> float | None:
    """Mean over heads of |image focus| (`image_focus`): 0 when every head splits its perceptual mass as a
    uniform head would given the token counts; larger as heads favour one modality beyond that."""
    f = _focuses(heads)
    return float(np.mean(np.abs(f))) if f else None


def image_led_fraction(heads: list[dict]) -> float | None:
    """Fraction of heads whose image share is above a uniform head's (image focus > 0)."""
    f = _focuses(heads)
    return float(np.mean([x > 0 for x in f])) if f else None


DERIVED = {"modality_focus_mean": modality_focus, "image_led_fraction": image_led_fraction}  # from the head tables


def grounds(run: dict, threshold: float) -> bool | None:
    """Does the run's model ground: best-head strict pointing >= `threshold` on every modality it is
    scored on? None when it has no strict pointing (a latent-query model, or results from before it)."""
    strict = [run["summary"].get(pointing_best_strict(m)) for m in MODALITIES]
    strict = [v for v in strict if v is not None]
    return None if not strict else all(v >= threshold for v in strict)


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
