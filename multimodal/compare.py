"""`multimodal compare`: scripted comparison runs over a grid of configurations, and their report.

A study is a TOML file: the question it asks, the seeds, the evaluation budgets, `[base]`
`TrainConfig` overrides applied to every run, and a `[grid]` whose cartesian product (times
the seeds) gives the runs:

    name = "size"
    question = "Do larger fusion blocks have better-grounded, more specialised heads?"
    seeds = [0, 1, 2]
    eval_scenes = 200           # held-out scenes: matching accuracy and per-head grounding
    analysis_scenes = 64        # scenes for per-head metrics, redundancy and importance
    shapley_permutations = 20
    snapshots = [0, 100, 300]   # optional: also evaluate the model after these training steps
    [base]                      # TrainConfig overrides (dotted keys allowed) for every run
    preset = "default"
    steps = 300
    [grid]                      # cartesian product; TrainConfig fields or fusion.* / scene.*
    "fusion.dim" = [64, 128]
    "fusion.heads" = [2, 4]

Every run is checked before anything trains (unknown keys and bad values are refused by
name). Each run then trains (or loads a finished training of the same config), evaluates
on the same held-out scenes as every other run, and analyses its heads; its results go to
`OUT/runs/<run id>/done.json`, and a run whose done.json matches its config is skipped next
time. The report (`report.md`, PNG plots, `results.csv`, `results.json`) is written by
`multimodal.report` from the finished runs.

From Python:

    from multimodal.compare import load_study, plan_runs, run_study
    result = run_study("multimodal/studies/size.toml", "reports/size", workers=2)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import time
import tomllib
import traceback
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from tqdm import tqdm

from multimodal.analysis.importance import (ablation_importance, gradient_importance, importance_table,
                                            shapley_importance)
from multimodal.analysis.metrics import head_metric_table, js_divergence_matrix, maps_query_mask, redundancy_summary
from multimodal.data.pool import ScenePool, split_seeds
from multimodal.data.scenes import ONE_OBJECT, SceneConfig, hard_negative
from multimodal.evaluate import evaluate
from multimodal.fusion import FusionConfig
from multimodal.model import MultimodalModel
from multimodal.train import PRESETS, TrainConfig, build_model, load_config, matching_loss, scene_config, train
from multimodal.types import AttentionMaps, AudioGeometry, ImageGeometry, InputError, ModalityTokens, TextGeometry

STUDY_DIR = Path(__file__).resolve().parent / "studies"  # the shipped studies
RESULT_FORMAT = "multimodal-compare-run/1"  # bump when done.json changes meaning: old runs then rerun
DONE = "done.json"
ERROR = "error.txt"
MODEL = "model"  # checkpoint folder inside a run folder
BATCH = 32  # scenes per forward pass in the analysis
RUN_ONLY_KEYS = ("device", "workers")  # how a run executes, not what it computes: not in its fingerprint
# TrainConfig fields added after runs were published, at the value that reproduces those runs: left out of
# the fingerprint at that value, so adding a field does not make every finished run stale
NEUTRAL_KEYS = {"contrastive_hard_weight": 0.0, "negative_mining": 0.0, "curriculum_steps": 0,
                "masked_word_weight": 0.0, "freeze": [], "masked_word_rate": 0.3,
                "curriculum_scene": dict(ONE_OBJECT), "phrase_queries": False, "binding_negatives": 0.0,
                "encoder_lr_scales": {}, "match_over": "content"}
NEUTRAL_FUSION_KEYS = {"compete": False, "sinks": 0}  # the same inside the fusion table


# ---------------------------------------------------------------------------------------
# The study file
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    name: str
    question: str = ""
    seeds: tuple[int, ...] = (0,)
    eval_scenes: int = 200  # held-out scenes for matching accuracy and grounding (the same for every run)
    analysis_scenes: int = 64  # the first scenes of those, for per-head metrics, redundancy and importance
    shapley_permutations: int = 20  # Monte Carlo permutations for head Shapley values
    snapshots: tuple[int, ...] = ()  # training steps at which the model is evaluated too (0 = untrained)
    baselines: bool = True  # uniform-map / random-init / gradient-relevance grounding baselines
    eval_seed: int = 0  # which held-out scenes (split "test") every run is evaluated on
    redundancy_threshold: float = 0.3  # sqrt-JS distance under which heads are clustered as redundant
    base: Mapping[str, Any] = field(default_factory=dict)  # flattened TrainConfig overrides (+ "preset")
    grid: Mapping[str, tuple] = field(default_factory=dict)  # flattened key -> values, in file order

    def to_dict(self) -> dict:
        d = asdict(self)
        d["base"], d["grid"] = dict(self.base), {k: list(v) for k, v in self.grid.items()}
        return d


STUDY_KEYS = tuple(f.name for f in fields(Study))


def _type_ok(value: Any, ann: str) -> bool:
    """Does a TOML value fit a dataclass field annotation (as written in the source)?"""
    if ann == "bool":
        return isinstance(value, bool)
    if ann == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if ann == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann == "str":
        return isinstance(value, str)
    if ann.startswith("tuple[int"):
        return isinstance(value, (list, tuple)) and all(_type_ok(v, "int") for v in value)
    if ann.startswith("Mapping"):
        return isinstance(value, Mapping)
    return True


def _annotation(f) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def config_fields() -> dict[str, str]:
    """Every key a study may set -> its annotation: TrainConfig fields, fusion.*, scene.*."""
    out = {f.name: _annotation(f) for f in fields(TrainConfig) if f.name not in ("fusion", "scene")}
    out.update({f"fusion.{f.name}": _annotation(f) for f in fields(FusionConfig)})
    out.update({f"scene.{f.name}": _annotation(f) for f in fields(SceneConfig)})
    return out


def _flatten(table: Mapping) -> dict[str, Any]:
    """`{"fusion": {"dim": 64}}` (TOML's bare dotted keys) and `{"fusion.dim": 64}` alike -> dotted keys."""
    out = {}
    for key, value in table.items():
        if key in ("fusion", "scene") and isinstance(value, Mapping):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    return out


def _check_key_value(key: str, value: Any, where: str, known: dict[str, str]) -> None:
    if key not in known:
        close = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"{where}: unknown key {key!r}{hint}; valid keys: TrainConfig fields "
                         f"{sorted(k for k in known if '.' not in k)}, fusion.* and scene.* fields")
    if not _type_ok(value, known[key]):
        raise InputError(f"{where}: {key} = {value!r} must be {known[key]}")


def study_from_dict(d: Mapping[str, Any], source: str = "study") -> Study:
    """Check a parsed study file and build the `Study`. Each error names the key."""
    unknown = sorted(set(d) - set(STUDY_KEYS))
    if unknown:
        raise InputError(f"{source}: unknown study key(s) {unknown}; valid keys: {list(STUDY_KEYS)}")
    if "name" not in d:
        raise InputError(f"{source}: the study needs a name (name = \"...\")")
    for f in fields(Study):
        key, ann = f.name, _annotation(f)
        if key not in ("base", "grid") and key in d and not _type_ok(d[key], ann):
            raise InputError(f"{source}: {key} = {d[key]!r} must be {ann}")
    for key in ("eval_scenes", "analysis_scenes", "shapley_permutations"):
        if key in d and d[key] < 1:
            raise InputError(f"{source}: {key} = {d[key]} must be >= 1")
    if "redundancy_threshold" in d and d["redundancy_threshold"] <= 0:
        raise InputError(f"{source}: redundancy_threshold = {d['redundancy_threshold']} must be > 0")
    seeds = tuple(d.get("seeds", (0,)))
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise InputError(f"{source}: seeds = {list(seeds)} must be a non-empty list of distinct integers >= 0")
    snapshots = tuple(d.get("snapshots", ()))
    if any(s < 0 for s in snapshots) or len(set(snapshots)) != len(snapshots):
        raise InputError(f"{source}: snapshots = {list(snapshots)} must be distinct training steps >= 0")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", d["name"]):
        raise InputError(f"{source}: name = {d['name']!r} may hold only letters, digits, '.', '_' and '-'")

    known = config_fields()
    for table in ("base", "grid"):
        if table in d and not isinstance(d[table], Mapping):
            raise InputError(f"{source}: {table} must be a table ([{table}])")
    base = _flatten(d.get("base", {}))
    preset = base.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise InputError(f"{source}: base.preset = {preset!r} is unknown; presets: {sorted(PRESETS)}")
    grid = _flatten(d.get("grid", {}))
    for key, why in (("seed", "the study's seeds = [...] list"), ("snapshots", "the study's snapshots = [...]"),
                     ("preset", "[base]")):
        for where, table in (("base", base), ("grid", grid)):
            if key in table and not (where == "base" and key == "preset"):
                raise InputError(f"{source}: {where}.{key} is not allowed here: use {why}")
    for key, value in base.items():
        _check_key_value(key, value, f"{source} [base]", known)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise InputError(f"{source} [grid]: {key} = {values!r} must be a non-empty list of values")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise InputError(f"{source} [grid]: {key} = {values!r} lists a value twice")
        for v in values:
            _check_key_value(key, v, f"{source} [grid]", known)
    if preset is not None:
        base = {"preset": preset, **base}
    return Study(name=d["name"], question=d.get("question", ""), seeds=seeds,
                 eval_scenes=d.get("eval_scenes", Study.eval_scenes),
                 analysis_scenes=d.get("analysis_scenes", Study.analysis_scenes),
                 shapley_permutations=d.get("shapley_permutations", Study.shapley_permutations),
                 snapshots=tuple(sorted(snapshots)), baselines=d.get("baselines", Study.baselines),
                 eval_seed=d.get("eval_seed", Study.eval_seed),
                 redundancy_threshold=float(d.get("redundancy_threshold", Study.redundancy_threshold)),
                 base=base, grid={k: tuple(v) for k, v in grid.items()})


def shipped_studies() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.toml"))


def load_study(path_or_name: str | Path) -> Study:
    """A study TOML file, or the name of a shipped study (`size`, `attention_kind`, ...)."""
    path = Path(path_or_name)
    if not path.is_file() and (STUDY_DIR / f"{path_or_name}.toml").is_file():
        path = STUDY_DIR / f"{path_or_name}.toml"
    if not path.is_file():
        raise InputError(f"no study file {path_or_name!r}; give a TOML file or one of the shipped studies: "
                         f"{', '.join(shipped_studies())}")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"cannot read study {path}: {e}")
    return study_from_dict(d, source=str(path))


# ---------------------------------------------------------------------------------------
# Runs: one per grid point and seed, each with a readable, deterministic id
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    run_id: str  # e.g. "fusion.dim=64,fusion.heads=2,seed=0"
    point: tuple[tuple[str, Any], ...]  # (grid key, value) in grid order
    seed: int
    config: TrainConfig

    @property
    def group(self) -> str:
        """The grid point without the seed (the runs of one group differ only by seed)."""
        return point_label(self.point)


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format(v, "g")
    if isinstance(v, (str, int)):
        return str(v)
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def point_label(point: tuple[tuple[str, Any], ...]) -> str:
    return ",".join(f"{k}={_format_value(v)}" for k, v in point) or "base"


def run_name(point: tuple[tuple[str, Any], ...], seed: int) -> str:
    text = ",".join([f"{k}={_format_value(v)}" for k, v in point] + [f"seed={seed}"])
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def plan_runs(study: Study, check_models: bool = True) -> list[Run]:
    """Every run of the study, in grid order then seed order, each config checked.

    Raises `InputError` naming the run and the key before anything has run. With
    `check_models`, one model per distinct architecture is also built (random weights, no
    training), which catches encoder specs that cannot be loaded.
    """
    base = dict(study.base)
    preset = base.pop("preset", None)
    keys = list(study.grid)
    train_snapshots = tuple(s for s in study.snapshots if s > 0)  # step 0 is the untrained model: built, not saved
    runs, seen = [], set()
    for values in itertools.product(*(study.grid[k] for k in keys)):
        point = tuple(zip(keys, values))
        for seed in study.seeds:
            run_id = run_name(point, seed)
            if run_id in seen:
                raise InputError(f"two runs would share the folder {run_id!r}; make the grid values differ in "
                                 "letters or digits")
            seen.add(run_id)
            try:
                tc = load_config(preset, None, {**base, **dict(point), "seed": seed, "snapshots": train_snapshots})
            except InputError as e:
                raise InputError(f"run {run_id}: {e}") from None
            except (TypeError, ValueError) as e:
                raise InputError(f"run {run_id}: a value of {sorted(base) + keys} has the wrong type ({e})") from None
            if tc.manifest:
                raise InputError(f"run {run_id}: manifest = {tc.manifest!r}: compare evaluates grounding on the "
                                 "procedural scenes, so its runs train on them too; leave manifest out")
            late = [s for s in study.snapshots if s > tc.steps]
            if late:
                raise InputError(f"run {run_id}: snapshots {late} are after the last training step (steps = "
                                 f"{tc.steps})")
            runs.append(Run(run_id, point, seed, tc))
    if check_models:
        built = set()
        for run in runs:
            arch = json.dumps(_architecture(run.config), sort_keys=True)
            if arch not in built:
                built.add(arch)
                try:
                    build_model(run.config)
                except InputError as e:
                    raise InputError(f"run {run.run_id}: {e}") from None
    return runs


def _architecture(tc: TrainConfig) -> dict:
    return {"fusion": dict(tc.fusion), "match": tc.match,
            "encoders": [tc.text_encoder, tc.image_encoder, tc.audio_encoder]}


def _comparable(config: Mapping) -> dict:
    """A config dict without the keys that change how a run executes but not its numbers."""
    d = json.loads(json.dumps(dict(config)))
    for key in RUN_ONLY_KEYS:
        d.pop(key, None)
    for key, neutral in NEUTRAL_KEYS.items():
        if d.get(key) == neutral:
            d.pop(key)
    for key, neutral in NEUTRAL_FUSION_KEYS.items():
        if isinstance(d.get("fusion"), dict) and d["fusion"].get(key) == neutral:
            d["fusion"].pop(key)
    return d


def fingerprint(run: Run, study: Study) -> str:
    """What a run computes: its training config and the study's evaluation settings."""
    analysis = {k: getattr(study, k) for k in ("eval_scenes", "analysis_scenes", "shapley_permutations",
                                               "snapshots", "baselines", "eval_seed", "redundancy_threshold")}
    text = json.dumps({"format": RESULT_FORMAT, "config": _comparable(run.config.to_dict()),
                       "analysis": analysis}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_status(run: Run, study: Study, runs_dir: Path) -> str:
    """'done', 'stale' (finished under another config or study setting), 'failed' or 'pending'."""
    folder = runs_dir / run.run_id
    done = folder / DONE
    if done.is_file():
        try:
            ok = json.loads(done.read_text()).get("fingerprint") == fingerprint(run, study)
        except (OSError, json.JSONDecodeError):
            ok = False
        return "done" if ok else "stale"
    return "failed" if (folder / ERROR).is_file() else "pending"


# ---------------------------------------------------------------------------------------
# Analysis of one model: evaluation, per-head metrics, redundancy, importance
# ---------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rows(t: ModalityTokens, a: int, b: int) -> ModalityTokens:
    """Items a..b-1 of a batch of tokens, geometry included."""
    g = t.geometry
    if isinstance(g, TextGeometry):
        g = replace(g, texts=g.texts[a:b], tokens=g.tokens[a:b], spans=g.spans[a:b])
    elif isinstance(g, AudioGeometry):
        g = replace(g, durations=g.durations[a:b])
    elif isinstance(g, ImageGeometry) and g.original_sizes:
        g = replace(g, original_sizes=g.original_sizes[a:b])
    return ModalityTokens(t.tokens[a:b], t.mask[a:b], t.modality, t.special[a:b], g)


def _cpu_maps(maps: AttentionMaps) -> AttentionMaps:
    return replace(maps, weights={l: w.detach().float().cpu() for l, w in maps.weights.items()},
                   key_mask=maps.key_mask.cpu(),
                   key_special=maps.key_special.cpu(), query_mask=maps.query_mask.cpu(),
                   query_special=None if maps.query_special is None else maps.query_special.cpu())


@torch.no_grad()
def matching_only(model: MultimodalModel, scenes: int, seed: int, scene_cfg: SceneConfig,
                  batch_size: int = BATCH) -> dict:
    """`evaluate`'s matching numbers (same scenes, same negatives) without the grounding: for
    models whose queries are not text tokens, which the grounding evaluation cannot score."""
    return evaluate(model, scenes=scenes, seed=seed, batch_size=batch_size, scene_cfg=scene_cfg,
                    baselines=False, progress=False, grounding=False)["matching"]


@dataclass
class AnalysisSet:
    """Held-out scenes encoded once: the encoders do not depend on the head mask, so only the
    fusion block reruns for each coalition of heads."""

    true: list[dict[str, ModalityTokens]]  # per batch: scenes with their true captions (B items)
    pairs: list[dict[str, ModalityTokens]]  # per batch: [true, hard negative] per scene (2B items)
    sizes: list[int]  # scenes per batch

    @classmethod
    @torch.no_grad()
    def build(cls, model: MultimodalModel, scenes: int, seed: int, scene_cfg: SceneConfig) -> "AnalysisSet":
        pool = ScenePool.build(model, split_seeds("test", scenes, seed), scene_cfg, 1, "generating analysis scenes")
        rng = np.random.default_rng(seed + 1)
        text = model.encoders["text"]
        true, pairs, sizes = [], [], []
        for start in range(0, scenes, BATCH):
            idx = list(range(start, min(start + BATCH, scenes)))
            group = [pool.scenes[i] for i in idx]
            scene_tokens = model.encode(pool.batch(model, idx))
            caps = [s.caption for s in group]
            interleaved = [c for s in group for c in (s.caption, hard_negative(s, rng)[0])]
            true.append({**scene_tokens, "text": text(text.preprocess(caps))})
            pairs.append({**{m: t.repeat(2) for m, t in scene_tokens.items()},
                          "text": text(text.preprocess(interleaved))})
            sizes.append(len(idx))
        return cls(true, pairs, sizes)

    def margins(self, model: MultimodalModel, head_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(scenes,) score of the true caption minus that of its hard negative."""
        out = []
        for p in self.pairs:
            s = model.fuse(p, head_mask=head_mask).score.view(-1, 2)  # (B, 2)
            out.append(s[:, 0] - s[:, 1])
        return torch.cat(out).float().cpu()

    def example(self, i: int) -> dict[str, ModalityTokens]:
        """Scene i's [true, negative] pair as a batch of 2."""
        b = 0
        while i >= self.sizes[b]:
            i, b = i - self.sizes[b], b + 1
        return {m: _rows(t, 2 * i, 2 * i + 2) for m, t in self.pairs[b].items()}


def _nanmean(values) -> float | None:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


@torch.no_grad()
def head_metrics(model: MultimodalModel, data: AnalysisSet, threshold: float) -> tuple[list[dict], dict]:
    """Per-head metrics (entropy, confidence, modality share, spread) averaged over the
    analysis scenes, and the JS redundancy summary over all heads of all layers."""
    L, H = model.cfg.layers, model.cfg.heads
    sums, weights = defaultdict(float), defaultdict(float)
    D, total = torch.zeros(L * H, L * H, dtype=torch.float64), 0
    for tokens, n in zip(data.true, data.sizes):
        maps = _cpu_maps(model.fuse(tokens, return_maps=True).maps)
        for l in maps.layers:
            for row in head_metric_table(maps, l, content_queries=True):
                for k, v in row.items():
                    if k not in ("layer", "head") and math.isfinite(v):
                        sums[(l, row["head"], k)] += v * n
                        weights[(l, row["head"], k)] += n
        A = torch.cat([maps.weights[l] for l in maps.layers], 1)  # (B, L*H, Nq, Nk)
        D += js_divergence_matrix(A, maps.key_mask, maps_query_mask(maps, True)).double() * n
        total += n
    names = sorted({k for (_, _, k) in sums})
    rows = [{"layer": l, "head": h, **{k: (sums[(l, h, k)] / weights[(l, h, k)] if weights[(l, h, k)] else None)
                                       for k in names}} for l in range(L) for h in range(H)]
    red = redundancy_summary(D / max(total, 1), threshold)

    def label(i: int) -> str:  # position along the (L*H, L*H) matrix -> "L0H1"
        return f"L{i // H}H{i % H}"

    red["clusters"] = [[label(i) for i in c] for c in red["clusters"]]
    if red["most_similar_pair"] is not None:
        red["most_similar_pair"] = [label(i) for i in red["most_similar_pair"]]
    return rows, red


def head_importance(model: MultimodalModel, data: AnalysisSet, permutations: int, seed: int) -> tuple[list[dict], dict]:
    """Ablation, gradient and Shapley importance of every head for the task metric: the mean
    margin of the true caption's score over a one-attribute hard negative."""
    L, H, dev = model.cfg.layers, model.cfg.heads, model.device

    def value_fn(mask):
        return data.margins(model, mask).mean()

    def loss_fn(mask, i):
        return matching_loss(model.fuse(data.example(i), head_mask=mask).score.view(1, 2))

    with torch.no_grad():
        full = data.margins(model)
        none = data.margins(model, torch.zeros(L, H, device=dev))
    abl = ablation_importance(value_fn, L, H, device=dev)
    grad = gradient_importance(loss_fn, L, H, sum(data.sizes), device=dev)
    shap = shapley_importance(value_fn, L, H, permutations=permutations, seed=seed, device=dev)
    summary = {"metric": "mean margin of the true caption's score over a one-attribute hard negative "
                         "(zero-ablation of heads)",
               "margin_all_heads": float(full.mean()), "margin_no_heads": float(none.mean()),
               "accuracy_all_heads": float((full > 0).float().mean()),
               "accuracy_no_heads": float((none > 0).float().mean()), "permutations": permutations}
    return importance_table(abl, grad, shap), summary


def _timed_fusion(model: MultimodalModel, data: AnalysisSet, repeats: int = 3) -> float:
    """Median seconds of one fusion pass over the analysis pairs (no maps: the fast path)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            data.margins(model)
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def analyse_model(model: MultimodalModel, tc: TrainConfig, study: Study, progress: bool = True,
                  importance: bool = True) -> dict:
    """Evaluate one trained model and analyse its heads. Timings go under "timing" only."""
    model.eval()
    cfg = scene_config(tc)
    seed_everything(study.eval_seed)
    t0 = time.perf_counter()
    grounding = None
    if model.cfg.query == "text":
        ev = evaluate(model, scenes=study.eval_scenes, seed=study.eval_seed, scene_cfg=cfg,
                      baselines=study.baselines, progress=progress)
        matching = ev["matching"]
        grounding = {"summary": ev["summary"], "baselines": ev["baselines"], "heads": ev["heads"]}
    else:
        matching = matching_only(model, study.eval_scenes, study.eval_seed, cfg)
    eval_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    data = AnalysisSet.build(model, study.analysis_scenes, study.eval_seed, cfg)
    heads, redundancy = head_metrics(model, data, study.redundancy_threshold)
    by_head = {(r["layer"], r["head"]): r for r in heads}
    for g in (grounding or {}).get("heads", []):
        row = by_head[(g["layer"], g["head"])]
        for k in ("pointing", "energy", "energy_gain"):
            row[f"{k}_{g['modality']}"] = g[k]
    imp_summary = None
    if importance:
        imp_rows, imp_summary = head_importance(model, data, study.shapley_permutations, study.eval_seed)
        for r in imp_rows:
            by_head[(r["layer"], r["head"])].update({k: v for k, v in r.items() if k not in ("layer", "head")})
    fusion_s = _timed_fusion(model, data)
    analysis_s = time.perf_counter() - t1
    result = {"matching": matching, "grounding": None if grounding is None else
              {"summary": grounding["summary"], "baselines": grounding["baselines"]},
              "heads": heads, "redundancy": redundancy, "importance": imp_summary,
              "timing": {"eval_s": eval_s, "analysis_s": analysis_s, "fusion_pass_s": fusion_s,
                         "fusion_pairs": 2 * sum(data.sizes)}}
    result["summary"] = summarise(result)
    return result


def summarise(result: dict) -> dict:
    """The flat numbers one run is compared by (None where a metric does not apply)."""
    heads = result["heads"]
    s = {"matching_accuracy": result["matching"].get("all", {}).get("accuracy")}
    g = result["grounding"] or {"summary": {}, "baselines": {}}
    for mod in ("image", "audio"):
        gm = g["summary"].get(mod)
        s[f"pointing_{mod}_best"] = gm["best_pointing"] if gm else None
        s[f"energy_{mod}_mean"] = gm["mean_energy"] if gm else None
        s[f"energy_gain_{mod}_mean"] = gm["mean_energy_gain"] if gm else None
        for src in ("uniform", "random_init"):
            b = g["baselines"].get(mod, {}).get(src)
            s[f"{src}_pointing_{mod}_best"] = b["best_pointing"] if b else None
    for k in ("entropy", "scaled_confidence", "share_text", "share_image", "share_audio", "spread_px", "spread_s"):
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
# One run: train (or load), analyse the final model and the snapshots, write done.json
# ---------------------------------------------------------------------------------------


def _finished_training(model_dir: Path, tc: TrainConfig) -> dict | None:
    """The train summary of a finished training of this very config, or None."""
    path = model_dir / "train_summary.json"
    if not path.is_file() or not (model_dir / "model.safetensors").is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if _comparable(summary.get("config", {})) != _comparable(tc.to_dict()) or summary.get("steps") != tc.steps:
        return None
    return summary


def execute_run(run: Run, study: Study, runs_dir: str | Path, progress: bool = True) -> dict:
    """Train (or load), evaluate and analyse one run; write and return its done.json results.

    Runs with the process's torch threads (a worker process's are set when it starts)."""
    folder = Path(runs_dir) / run.run_id
    if run_status(run, study, Path(runs_dir)) == "done":
        return json.loads((folder / DONE).read_text())
    tc = run.config
    model_dir = folder / MODEL
    summary = _finished_training(model_dir, tc)
    if summary is None:
        if folder.exists():
            shutil.rmtree(folder)  # a half-finished or differently configured run: start clean
        folder.mkdir(parents=True)
        seed_everything(run.seed)
        summary = train(tc, model_dir, resume=False, progress=progress)
        loaded = False
    else:
        (folder / ERROR).unlink(missing_ok=True)
        loaded = True
    threads = torch.get_num_threads()
    model = MultimodalModel.from_pretrained(model_dir, map_location=tc.device)
    final = analyse_model(model, tc, study, progress=progress)
    snapshots = []
    for step in study.snapshots:
        if step == tc.steps:
            s = {k: final[k] for k in ("matching", "grounding", "redundancy", "summary", "timing")}
        else:
            m = (build_model(tc).to(tc.device) if step == 0 else
                 MultimodalModel.from_pretrained(model_dir / "snapshots" / f"step_{step}", map_location=tc.device))
            s = analyse_model(m, tc, study, progress=progress, importance=False)
            s.pop("heads")
        snapshots.append({"step": step, **s})
    history = [{k: v for k, v in h.items() if k != "elapsed_s"} for h in summary.get("history", [])]
    result = {
        "format": RESULT_FORMAT, "run_id": run.run_id, "group": run.group, "point": dict(run.point),
        "seed": run.seed, "fingerprint": fingerprint(run, study), "config": run.config.to_dict(),
        "fusion_params": sum(p.numel() for p in model.fusion.parameters()),
        "query": model.cfg.query, "attention": model.cfg.attention,
        "train": {"steps": summary["steps"], "history": history, "loaded": loaded},
        **{k: final[k] for k in ("matching", "grounding", "heads", "redundancy", "importance", "summary")},
        "snapshots": snapshots,
        "timing": {"train_s": summary["wall_time_s"], **final["timing"], "threads": threads},
    }
    tmp = folder / (DONE + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(folder / DONE)
    (folder / ERROR).unlink(missing_ok=True)
    return result


def without_timing(result: dict) -> dict:
    """A run's results minus wall-clock numbers and how it was executed: what "the same config and
    seed give the same numbers" compares."""
    out = json.loads(json.dumps(result))
    out.pop("timing", None)
    out["train"].pop("loaded", None)
    for key in RUN_ONLY_KEYS:
        out["config"].pop(key, None)
    for s in out.get("snapshots", []):
        s.pop("timing", None)
    return out


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _record_failure(runs_dir: str | Path, run_id: str) -> str:
    """The current exception's traceback, written to the run's error.txt and returned."""
    text = traceback.format_exc()
    folder = Path(runs_dir) / run_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ERROR).write_text(text)
    return text


def _worker_job(job: tuple) -> tuple[str, str | None]:
    run, study, runs_dir = job
    try:
        execute_run(run, study, runs_dir, progress=False)
        return run.run_id, None
    except Exception:  # one broken run must not take the others down: recorded, reported, exit code 1
        return run.run_id, _record_failure(runs_dir, run.run_id)


# ---------------------------------------------------------------------------------------
# A whole study
# ---------------------------------------------------------------------------------------


def run_study(study: Study | str | Path, out: str | Path | None = None, workers: int = 1, progress: bool = True,
              report: bool = True) -> dict:
    """Run every run of a study that is not done yet, then write the report.

    `study` is a `Study`, a TOML path or a shipped study's name; `out` the report folder
    (default `reports/<name>`). With `workers` > 1 independent runs go to that many
    spawned processes, each with `cores // workers` torch threads. Returns
    `{"runs": [done.json results in plan order], "ran": [...], "skipped": [...], "failed":
    {run_id: traceback}, "report": {name: path}}`.
    """
    if not isinstance(study, Study):
        study = load_study(study)
    if workers < 1:
        raise InputError(f"workers = {workers} must be >= 1")
    out = Path(out or Path("reports") / study.name)
    runs = plan_runs(study)  # every config checked before anything is created
    runs_dir = out / "runs"
    status = {r.run_id: run_status(r, study, runs_dir) for r in runs}
    pending = [r for r in runs if status[r.run_id] != "done"]
    skipped = [r.run_id for r in runs if status[r.run_id] == "done"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study.to_dict(), indent=1))
    failed: dict[str, str] = {}
    bar = tqdm(total=len(runs), initial=len(skipped), desc=f"study {study.name}: runs", disable=not progress,
               position=0)
    if skipped and progress:
        bar.write(f"{len(skipped)} of {len(runs)} runs already done: skipped")
    cores = os.cpu_count() or 1
    if workers == 1 or len(pending) <= 1:
        for run in pending:
            bar.set_postfix_str(run.run_id)
            try:
                execute_run(run, study, runs_dir, progress=progress)
            except Exception:
                failed[run.run_id] = _record_failure(runs_dir, run.run_id)
                bar.write(f"run {run.run_id} FAILED (traceback in {runs_dir / run.run_id / ERROR})")
            bar.update(1)
    else:
        n = min(workers, len(pending))
        threads = max(1, cores // n)
        jobs = [(replace(r, config=replace(r.config, workers=min(r.config.workers, threads))), study, runs_dir)
                for r in pending]
        with ProcessPoolExecutor(n, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(threads,)) as pool:
            for future in as_completed([pool.submit(_worker_job, job) for job in jobs]):
                run_id, error = future.result()
                if error:
                    failed[run_id] = error
                    bar.write(f"run {run_id} FAILED (traceback in {runs_dir / run_id / ERROR})")
                else:
                    bar.write(f"run {run_id} done")
                bar.update(1)
    bar.close()
    results = finished_results(study, runs, runs_dir)
    paths = report_from(study, results, runs, out) if report else {}
    return {"runs": results, "ran": [r.run_id for r in pending if r.run_id not in failed], "skipped": skipped,
            "failed": failed, "report": paths}


def finished_results(study: Study, runs: list[Run], runs_dir: Path) -> list[dict]:
    """The done.json results of the runs that are done (current fingerprint), in plan order."""
    return [json.loads((runs_dir / r.run_id / DONE).read_text()) for r in runs
            if run_status(r, study, runs_dir) == "done"]


def report_from(study: Study, results: list[dict], runs: list[Run], out: Path) -> dict[str, Path]:
    from multimodal.report import write_report  # matplotlib: only when a report is written

    return write_report(study, results, out, planned=[r.run_id for r in runs])


def describe_runs(study: Study, out: str | Path) -> str:
    """The dry-run listing: every run, its status and its fusion parameter count."""
    runs = plan_runs(study, check_models=False)
    runs_dir = Path(out) / "runs"
    params = {}
    points = max(1, len(runs) // len(study.seeds))
    lines = [f"study {study.name}: {len(runs)} runs ({points} grid point{'s' * (points > 1)} x "
             f"{len(study.seeds)} seed{'s' * (len(study.seeds) > 1)}) -> {out}"]
    if study.question:
        lines.append(f"question: {study.question}")
    counts = defaultdict(int)
    for r in runs:
        arch = json.dumps(_architecture(r.config), sort_keys=True)
        if arch not in params:
            params[arch] = sum(p.numel() for p in build_model(r.config).fusion.parameters())
        status = run_status(r, study, runs_dir)
        counts[status] += 1
        lines.append(f"  [{status:7s}] {r.run_id}  (steps {r.config.steps}, fusion params {params[arch]:,})")
    lines.append("to run: " + str(sum(v for k, v in counts.items() if k != "done")) +
                 f"; done: {counts['done']}" + (f"; stale (config changed, will rerun): {counts['stale']}"
                                                if counts["stale"] else ""))
    return "\n".join(lines)
