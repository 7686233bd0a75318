"""`multimodal eval`: matching accuracy and per-head grounding on held-out scenes, with baselines.

For every referring phrase of a held-out caption, the phrase's text tokens are the queries:
their rows of each head's map (renormalised within the image or the audio) are averaged and
scored against the referent's ground truth: pointing game and energy inside the object mask
for images, temporal pointing and mass inside the interval for audio (docs/metrics.md section 5).
Baselines on the same scenes: a uniform map, the same architecture with random weights, and
gradient-weighted relevance (grad x attention, Chefer et al. style) of the evaluated model.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from multimodal.analysis.grounding import (METRICS, POINTING_TOLERANCE_PX, TIME_TOLERANCE_COLUMNS, audio_columns,
                                          column_spacing, phrase_tokens, score_phrase)
from multimodal.analysis.relevance import relevance_maps
from multimodal.data.pool import MAX_SPLIT_SCENES, ScenePool, split_seeds
from multimodal.data.scenes import CHANGE_TYPES, REPEAT, SceneConfig, change_kinds, hard_negative
from multimodal.data.truth import GroundTruth, from_scene
from multimodal.model import MultimodalModel, score_candidates
from multimodal.types import AttentionMaps, InputError

class GroundingTally:
    """Accumulates per-(layer, head) hits and energies for image objects and audio events."""

    def __init__(self):
        self.rows = defaultdict(list)  # (source, modality, layer, head, metric) -> values

    def add(self, source, modality, layer, head, metric, values):
        self.rows[(source, modality, layer, head, metric)].extend(float(v) for v in values)

    def mean(self, key) -> float:
        v = self.rows.get(key)
        return float(np.mean(v)) if v else float("nan")


def ground_batch(tally: GroundingTally, source: str, maps_per_layer: dict[int, dict[str, torch.Tensor]],
                 scenes, maps: AttentionMaps, gen: torch.Generator) -> None:
    """Score one batch by the one per-phrase definition (`multimodal.analysis.grounding.score_phrase`,
    shared with the app). `maps_per_layer[l]["image"]` is (B, h, Nq, gh, gw), `["audio"]`
    (B, h, Nq, T); `scenes` are generated scenes or `GroundTruth`s, one per batch item."""
    times, valid = audio_columns(maps) if "audio" in maps.segments else (None, None)
    for b, scene in enumerate(scenes):
        truth = scene if isinstance(scene, GroundTruth) else from_scene(scene)
        masks = truth.object_masks()  # at the scene's image resolution
        for phrase in truth.phrases:
            q = phrase_tokens(maps, b, phrase["span"])
            if not q.any():
                continue
            for layer, per_mod in maps_per_layer.items():
                scored = score_phrase({m: t[b] for m, t in per_mod.items()}, q, phrase, masks, truth.events, times,
                                      None if valid is None else valid[b], gen)
                if scored is None:
                    continue
                modality, values = scored
                kind = referent_kind(scene, phrase) if source == "model" else None
                for h in range(len(values["pointing"])):
                    for metric in METRICS:
                        tally.add(source, modality, layer, h, metric, [values[metric][h]])
                        if kind is not None:  # again under the referent's kind (`summarise`'s by_referent)
                            tally.add(f"{source}|{kind}", modality, layer, h, metric, [values[metric][h]])


def referent_kind(scene, phrase: dict) -> str | None:
    """A generated scene's referent's own kind: an object's size, an event's kind (None for a `GroundTruth`,
    which has neither)."""
    if isinstance(scene, GroundTruth):
        return None
    if phrase["target"] == "object":
        return str(scene.objects[phrase["index"]]["size"])
    return str(scene.events[phrase["index"]]["kind"])


def _modality_maps(maps: AttentionMaps, layer: int) -> dict[str, torch.Tensor]:
    out = {}
    if "image" in maps.segments:
        out["image"] = maps.image_maps(layer, renormalise=True).cpu()
    if "audio" in maps.segments:
        out["audio"] = maps.audio_maps(layer, renormalise=True).cpu()
    return out


def region_maps(maps: AttentionMaps, scenes, per_mod: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The best a map on these keys' grid can do, as one pseudo-head: each phrase's query rows hold every key
    cell's share of the phrase's referent (the share of each image cell's pixels on the object, of each audio
    column's time inside the event). `per_mod` gives the shapes: `{"image": (B, h, Nq, gh, gw), "audio":
    (B, h, Nq, T)}`. Scored like a head, its strict pointing is the ceiling the token grid sets: a small
    object that covers no cell's centre cannot be pointed at strictly by any map on 16-px cells."""
    out = {m: torch.zeros_like(t[:, :1]) for m, t in per_mod.items()}  # (B, 1, Nq, ...)
    grid = tuple(out["image"].shape[-2:]) if "image" in out else None  # (gh, gw)
    times, valid = audio_columns(maps) if "audio" in out else (None, None)
    d = column_spacing(times) if times is not None else None
    for b, scene in enumerate(scenes):
        truth = scene if isinstance(scene, GroundTruth) else from_scene(scene)
        masks = truth.object_masks()
        for phrase in truth.phrases:
            q = phrase_tokens(maps, b, phrase["span"])
            if phrase["target"] == "object" and grid is not None:
                share = F.adaptive_avg_pool2d(masks[phrase["index"]].float()[None, None], grid)[0, 0]  # (gh, gw)
                out["image"][b, 0, q] = share
            elif phrase["target"] == "event" and times is not None:
                start, end = truth.events[phrase["index"]]
                inside = (torch.clamp(times + d / 2, max=end) - torch.clamp(times - d / 2, min=start)).clamp_min(0)
                out["audio"][b, 0, q] = inside / d * valid[b]  # (T,)
    return out


def _uniform_like(per_mod: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {m: torch.ones_like(t[:, :1]) for m, t in per_mod.items()}


def random_init_like(model: MultimodalModel, seed: int) -> MultimodalModel:
    """The same architecture with fresh random weights (the 'untrained' baseline)."""
    torch.manual_seed(seed)
    fresh = copy.deepcopy(model)
    covered = set()
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
            covered.update(id(p) for p in module.parameters(recurse=False))
    for p in fresh.parameters():  # cls tokens, position tables, latents, modality embeddings
        if id(p) not in covered:
            torch.nn.init.normal_(p, std=0.02)
    return fresh.eval()


def _relevance_maps(model: MultimodalModel, batch, captions) -> tuple[AttentionMaps, dict]:
    """Gradient x attention per layer (clamped, head mean), as one pseudo-head per layer."""
    with torch.enable_grad():
        _, out = score_candidates(model, batch, captions, 1, return_maps=True)
        rel_maps = relevance_maps(out.score, out.maps)
    return rel_maps, {l: _modality_maps(rel_maps, l) for l in rel_maps.layers}


def _every_kind(model: MultimodalModel, batch: dict, group: list, kinds, draws: Mapping[str, np.random.Generator],
                every: dict) -> list[float]:
    """Each scene's caption against one negative of each of `kinds` it allows, drawn from `draws[kind]`
    (tallied into `every[kind]` = [true outscores it, it alone scores no match, pairs]); returns the true
    captions' logits."""
    caps, allowed = [], [change_kinds(s, repeat=REPEAT in kinds) for s in group]
    for s, ok in zip(group, allowed):  # the caption again where a kind does not apply (not tallied)
        caps += [s.caption] + [hard_negative(s, draws[k], change_type=k)[0] if k in ok else s.caption for k in kinds]
    with torch.no_grad():
        scores, _ = score_candidates(model, batch, caps, 1 + len(kinds))
    for ok, row in zip(allowed, scores.tolist()):
        for j, k in enumerate(kinds):
            if k in ok:
                every[k][0] += int(row[0] > row[1 + j])
                every[k][1] += int(row[1 + j] <= 0)
                every[k][2] += 1
    return scores[:, 0].tolist()


def evaluate(model: MultimodalModel, scenes: int = 500, seed: int = 0, batch_size: int = 32,
             scene_cfg: SceneConfig | None = None, baselines: bool = True, progress: bool = True,
             grounding: bool = True, min_pairs: int = 200, untrained: MultimodalModel | None = None) -> dict:
    """Matching accuracy by negative type and, with `grounding`, per-head grounding (+ baselines).

    Also every kind of negative on every scene that allows it; a kind that fewer than `min_pairs`
    of the scenes allow is measured on further test scenes (up to 10x `scenes` in all) until it has
    `min_pairs` pairs, so rare kinds (event order: two-event captions only) are measured, not guessed.
    `untrained`: the "random_init" baseline's model (a study passes each run's own initial weights, so the
    comparison is paired); by default the same architecture with fresh weights (`random_init_like`)."""
    if grounding and model.cfg.query != "text":
        raise InputError("grounding evaluation scores text-phrase queries: it needs a model with query='text' "
                         "(grounding=False measures matching only)")
    baselines = baselines and grounding
    t0 = time.perf_counter()
    model.eval()
    cfg = scene_cfg or SceneConfig(**model.meta.get("train_config", {}).get("scene", {}))
    pool = ScenePool.build(split_seeds("test", min(10 * scenes, MAX_SPLIT_SCENES), seed), cfg)  # more only if needed
    random_model = None
    if baselines:
        random_model = (untrained if untrained is not None else random_init_like(model, seed + 12345)).eval()
    tally = GroundingTally()
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    # the every-kind negatives on their own draws (the random draw above is unchanged), the repeated-event ones
    # on theirs (the kinds before them draw as they did before it existed)
    every_rng = np.random.default_rng([seed, 1])
    draws = {**dict.fromkeys(CHANGE_TYPES, every_rng), REPEAT: np.random.default_rng([seed, 2])}
    kinds_all = (*CHANGE_TYPES, REPEAT)
    wins = defaultdict(lambda: [0, 0])
    every = defaultdict(lambda: [0, 0, 0])  # kind -> [true caption outscores it, it scored no match, pairs]
    matched = defaultdict(lambda: [0, 0])  # which true captions -> [scored a match (p > 0.5), captions]
    for start in tqdm(range(0, scenes, batch_size), desc="evaluating", disable=not progress):
        idx = list(range(start, min(start + batch_size, scenes)))
        batch = pool.batch(model, idx)
        group = [pool.scenes[i] for i in idx]
        caps, kinds = [], []
        for s in group:
            neg, _, change = hard_negative(s, rng)
            caps += [s.caption, neg]
            kinds.append(change["type"])
        with torch.no_grad():
            scores, _ = score_candidates(model, batch, caps, 2)
        for k, (p, n) in zip(kinds, scores.tolist()):
            for key in (k, "all"):
                wins[key][0] += int(p > n)
                wins[key][1] += 1
        true_scores = _every_kind(model, batch, group, kinds_all, draws, every)
        for s, score in zip(group, true_scores):
            events = sum(p["target"] == "event" for p in s.phrases)
            for key in ("all", f"{events} event{'s' if events != 1 else ''}"):
                matched[key][0] += int(score > 0)
                matched[key][1] += 1
        if not grounding:
            continue
        with torch.no_grad():
            _, out = score_candidates(model, batch, [s.caption for s in group], 1, return_maps=True)
        maps = out.maps
        per_layer = {l: _modality_maps(maps, l) for l in maps.layers}
        ground_batch(tally, "model", per_layer, group, maps, gen)
        if baselines:
            ground_batch(tally, "uniform", {l: _uniform_like(per_layer[l]) for l in per_layer}, group, maps, gen)
            ground_batch(tally, "region", {0: region_maps(maps, group, per_layer[maps.layers[0]])}, group, maps, gen)
            with torch.no_grad():
                _, rout = score_candidates(random_model, batch, [s.caption for s in group], 1, return_maps=True)
            ground_batch(tally, "random_init", {l: _modality_maps(rout.maps, l) for l in rout.maps.layers},
                         group, rout.maps, gen)
            rel_maps, rel = _relevance_maps(model, batch, [s.caption for s in group])
            ground_batch(tally, "grad_relevance", rel, group, rel_maps, gen)
    # kinds fewer than min_pairs scenes allow (order needs a caption with two events): more test scenes
    # after the first `scenes`, each scored only against the kinds still short
    start, end = scenes, len(pool.scenes)
    while start < end and (short := [k for k in kinds_all if every[k][2] < min_pairs]):
        idx = list(range(start, min(start + batch_size, end)))
        group = [pool.scenes[i] for i in idx]
        keep = [i for i, s in zip(idx, group) if set(short) & set(change_kinds(s, repeat=REPEAT in short))]
        if keep:
            _every_kind(model, pool.batch(model, keep), [pool.scenes[i] for i in keep], short, draws, every)
        start += batch_size
    result = summarise(model, tally, wins, scenes, time.perf_counter() - t0)
    # a kind no scene of this config allows (captions about one modality: no colour change in a caption about
    # sounds) has no pairs to score: listed apart, not scored 0/0
    result["matching_every_kind"] = {k: {"accuracy": w / n, "rejected": r / n, "pairs": n}
                                     for k, (w, r, n) in every.items() if n}
    result["every_kind_absent"] = [k for k, (_, _, n) in every.items() if not n]
    result["every_kind_scenes"] = start  # test scenes the every-kind table drew from (the first `scenes`, then more)
    result["every_kind_min_pairs"] = min_pairs
    result["true_captions"] = {k: {"matched": m / n, "captions": n} for k, (m, n) in sorted(matched.items())}
    return result


def layer_summary(heads: list[dict]) -> list[dict]:
    """Per modality and fusion layer, from eval's per-head rows: the best head by strict pointing, the best
    strict and tolerant pointing among the layer's heads, and the means over them (pointing both ways, energy
    gain per phrase)."""
    out = []
    for mod in dict.fromkeys(r["modality"] for r in heads):
        for layer in sorted({r["layer"] for r in heads if r["modality"] == mod}):
            rows = [r for r in heads if r["modality"] == mod and r["layer"] == layer]
            best = max(rows, key=lambda r: r["pointing_strict"])
            out.append({"modality": mod, "layer": layer, "heads": len(rows), "best_head_strict": best["head"],
                        "best_pointing_strict": best["pointing_strict"],
                        "best_pointing": max(r["pointing"] for r in rows),
                        "mean_pointing_strict": float(np.mean([r["pointing_strict"] for r in rows])),
                        "mean_pointing": float(np.mean([r["pointing"] for r in rows])),
                        "mean_energy_gain": float(np.mean([r["energy_gain"] for r in rows]))})
    return out


def summarise(model, tally: GroundingTally, wins, scenes: int, seconds: float) -> dict:
    L, H = model.cfg.layers, model.cfg.heads
    result = {"scenes": scenes, "seconds": seconds,
              "matching": {k: {"accuracy": w / max(n, 1), "pairs": n} for k, (w, n) in sorted(wins.items())},
              "heads": [], "summary": {}, "baselines": {}}
    for mod in ("image", "audio"):
        rows = []
        for l in range(L):
            for h in range(H):
                key = ("model", mod, l, h)
                if not tally.rows.get(key + ("pointing",)):
                    continue
                rows.append({"modality": mod, "layer": l, "head": h,
                             "pointing": tally.mean(key + ("pointing",)),
                             "pointing_strict": tally.mean(key + ("pointing_strict",)),
                             "energy": tally.mean(key + ("energy",)),
                             "energy_gain": tally.mean(key + ("energy_gain",)),
                             "phrases": len(tally.rows[key + ("pointing",)])})
        if not rows:
            continue
        result["heads"] += rows
        best = max(rows, key=lambda r: r["pointing"])
        strict = max(rows, key=lambda r: r["pointing_strict"])
        result["summary"][mod] = {
            "best_head": {"layer": best["layer"], "head": best["head"]},
            "best_pointing": best["pointing"],
            "best_head_strict": {"layer": strict["layer"], "head": strict["head"]},
            "best_pointing_strict": strict["pointing_strict"],
            "mean_energy": float(np.mean([r["energy"] for r in rows])),
            "mean_energy_gain": float(np.mean([r["energy_gain"] for r in rows])),
        }
        result.setdefault("by_referent", {})[mod] = by_referent(tally, mod, rows, strict)
        for source in BASELINES:
            keys = [k for k in tally.rows if k[0] == source and k[1] == mod and k[4] == "pointing"]
            if not keys:
                continue
            pts = [tally.mean(k) for k in keys]
            strict = [tally.mean(k[:4] + ("pointing_strict",)) for k in keys]
            ens = [tally.mean(k[:4] + ("energy",)) for k in keys]
            gains = [tally.mean(k[:4] + ("energy_gain",)) for k in keys]
            result["baselines"].setdefault(mod, {})[source] = {
                "best_pointing": float(np.max(pts)), "mean_pointing": float(np.mean(pts)),
                "best_pointing_strict": float(np.max(strict)), "mean_pointing_strict": float(np.mean(strict)),
                "mean_energy": float(np.mean(ens)), "mean_energy_gain": float(np.mean(gains))}
    result["layers"] = layer_summary(result["heads"])
    return result


def by_referent(tally: GroundingTally, mod: str, rows: list[dict], best: dict) -> dict:
    """Per kind of referent (objects by size, events by kind): the phrases, the pointing of the modality's best
    head by strict pointing (`best`, a row of `rows`), the best head for that kind alone, and the mean energy
    gain over the heads. The best head's readings, weighted by phrases, give its overall ones back."""
    out = {}
    for kind in sorted({k[0].split("|", 1)[1] for k in tally.rows if k[0].startswith("model|") and k[1] == mod}):
        def mean(r, metric):
            return tally.mean((f"model|{kind}", mod, r["layer"], r["head"], metric))
        top = max(rows, key=lambda r: mean(r, "pointing_strict"))
        out[kind] = {"phrases": len(tally.rows[(f"model|{kind}", mod, best["layer"], best["head"], "pointing")]),
                     "best_head_pointing_strict": mean(best, "pointing_strict"),
                     "best_head_pointing": mean(best, "pointing"),
                     "best_for_kind": {"layer": top["layer"], "head": top["head"]},
                     "best_for_kind_pointing_strict": mean(top, "pointing_strict"),
                     "mean_energy_gain": float(np.mean([mean(r, "energy_gain") for r in rows]))}
    return out


BASELINE_NAMES = {"region": "region share (the grid's ceiling for pointing)"}
# grounding baselines, in the tables' order: chance, the untrained model, gradient relevance, and the ceiling
BASELINES = ("uniform", "random_init", "grad_relevance", "region")

TOLERANCE = {"image": f"within {POINTING_TOLERANCE_PX} px of the mask",
             "audio": f"within {TIME_TOLERANCE_COLUMNS:g} time column of the event"}


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _gain(x: float | None) -> str:
    """A per-phrase energy gain over the uniform map ("-" in reports written before baselines had one)."""
    return "-" if x is None else f"{x:.2f}x"


def _layer_table(result: dict, mod: str) -> list[str]:
    """Per fusion layer: best and mean pointing, strict and tolerant, and mean energy gain (reports written
    before eval.json had `layers` have no such table)."""
    rows = [r for r in result.get("layers", []) if r["modality"] == mod]
    if not rows:
        return []
    lines = ["", "| layer | best head, strict | best pointing, strict | best pointing | mean pointing, strict "
             "| mean pointing | mean energy / uniform |", "|---|---|---|---|---|---|---|"]
    return lines + [f"| {r['layer']} | H{r['best_head_strict']} | {r['best_pointing_strict']:.3f} | "
                    f"{r['best_pointing']:.3f} | {r['mean_pointing_strict']:.3f} | {r['mean_pointing']:.3f} | "
                    f"{_gain(r['mean_energy_gain'])} |" for r in rows]


def referent_table(result: dict, mod: str) -> list[str]:
    """Per kind of referent (objects by size, events by kind): where the best head's pointing misses (reports
    written before eval.json had `by_referent` have no such table)."""
    kinds = result.get("by_referent", {}).get(mod)
    if not kinds:
        return []
    b = result["summary"][mod]["best_head_strict"]
    lines = ["", f"By {'object size' if mod == 'image' else 'event kind'}: the best head by strict pointing "
             f"(L{b['layer']} H{b['head']}) and the best head for each kind alone.", "",
             "| referent | phrases | best head, strict | best head | best for it, strict | mean energy / uniform |",
             "|---|---|---|---|---|---|"]
    return lines + [f"| {k} | {v['phrases']} | {v['best_head_pointing_strict']:.3f} | {v['best_head_pointing']:.3f} | "
                    f"L{v['best_for_kind']['layer']} H{v['best_for_kind']['head']} "
                    f"{v['best_for_kind_pointing_strict']:.3f} | {_gain(v['mean_energy_gain'])} |"
                    for k, v in kinds.items()]


def markdown(result: dict) -> str:
    lines = [f"# Evaluation on {result['scenes']} held-out scenes", "",
             "## Matching accuracy (true caption outscores a one-attribute hard negative)", "",
             "| negative type | accuracy | pairs |", "|---|---|---|"]
    for k, v in result["matching"].items():
        lines.append(f"| {k} | {v['accuracy']:.3f} | {v['pairs']} |")
    if result.get("matching_every_kind"):
        lines += ["", "## Every kind of negative on every scene that allows it", "",
                  "Each scene's caption against one negative of every kind of change the scene allows (the "
                  f"table above draws one kind per scene); a kind fewer than {result.get('every_kind_min_pairs')} "
                  "of them allow is measured on further test scenes "
                  f"({result.get('every_kind_scenes', result['scenes'])} scanned in all). "
                  "Rejected: the negative alone scores no match (p <= 0.5).",
                  "", "| negative type | accuracy | rejected | pairs |", "|---|---|---|---|"]
        for k, v in result["matching_every_kind"].items():
            lines.append(f"| {k} | {v['accuracy']:.3f} | {v['rejected']:.3f} | {v['pairs']} |")
        if result.get("every_kind_absent"):
            lines += ["", f"No scene of this config allows {', '.join(result['every_kind_absent'])}: not scored."]
        if REPEAT in result["matching_every_kind"]:
            lines += ["", f"{REPEAT}: one event phrase of a two-event caption made into the other's (\"a falling chirp "
                      "then a falling chirp\" where one falling chirp is heard); drawn in training only with "
                      "`repeat_negatives`."]
    if result.get("true_captions"):
        lines += ["", "## True captions scored as a match (p > 0.5)", "", "| captions | matched | count |",
                  "|---|---|---|"]
        for k, v in result["true_captions"].items():
            lines.append(f"| {k} | {v['matched']:.3f} | {v['captions']} |")
    where = {"image": "on the object's mask", "audio": "inside the event"}
    for mod, s in result["summary"].items():
        strict = s.get("best_pointing_strict")  # None in reports written before strict pointing
        lines += ["", f"## {mod} grounding", "",
                  (f"Strict pointing (the peak {where[mod]}): best head L{s['best_head_strict']['layer']} "
                   f"H{s['best_head_strict']['head']}, {strict:.3f}. " if strict is not None else "")
                  + f"Tolerant pointing ({TOLERANCE[mod]}): best head L{s['best_head']['layer']} "
                  f"H{s['best_head']['head']}, {s['best_pointing']:.3f}. Mean over heads of energy inside the "
                  f"region {s['mean_energy']:.3f} ({s['mean_energy_gain']:.2f}x the uniform map).", "",
                  "| source | best pointing, strict | best pointing | mean pointing, strict | mean pointing "
                  "| mean energy | mean energy / uniform |", "|---|---|---|---|---|---|---|"]
        for src, b in result["baselines"].get(mod, {}).items():
            lines.append(f"| {BASELINE_NAMES.get(src, src)} | {_f(b.get('best_pointing_strict'))} | {b['best_pointing']:.3f} | "
                         f"{_f(b.get('mean_pointing_strict'))} | {b['mean_pointing']:.3f} | {b['mean_energy']:.3f} | "
                         f"{_gain(b.get('mean_energy_gain'))} |")
        lines += _layer_table(result, mod)
        lines += referent_table(result, mod)
        lines += ["", "| layer | head | pointing, strict | pointing | energy | energy / uniform |",
                  "|---|---|---|---|---|---|"]
        for r in result["heads"]:
            if r["modality"] == mod:
                lines.append(f"| {r['layer']} | {r['head']} | {_f(r.get('pointing_strict'))} | {r['pointing']:.3f} | "
                             f"{r['energy']:.3f} | {r['energy_gain']:.2f} |")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / "eval.json", out_dir / "eval.md"
    j.write_text(json.dumps(result, indent=1))
    m.write_text(markdown(result))
    return j, m
