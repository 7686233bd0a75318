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
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from multimodal.analysis.grounding import METRICS, audio_columns, phrase_tokens, score_phrase
from multimodal.data.pool import ScenePool, split_seeds
from multimodal.data.scenes import SceneConfig, hard_negative
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
                for h in range(len(values["pointing"])):
                    for metric in METRICS:
                        tally.add(source, modality, layer, h, metric, [values[metric][h]])


def _modality_maps(maps: AttentionMaps, layer: int) -> dict[str, torch.Tensor]:
    out = {}
    if "image" in maps.segments:
        out["image"] = maps.image_maps(layer, renormalise=True).cpu()
    if "audio" in maps.segments:
        out["audio"] = maps.audio_maps(layer, renormalise=True).cpu()
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
        maps = out.maps
        weights = [maps.weights[l] for l in maps.layers]
        grads = torch.autograd.grad(out.score.sum(), weights)
    rel = {l: (g * w).clamp_min(0).mean(1, keepdim=True).detach() for l, g, w in zip(maps.layers, grads, weights)}
    rel_maps = AttentionMaps(weights=rel, heads={l: [0] for l in rel}, segments=maps.segments,
                             key_mask=maps.key_mask, key_special=maps.key_special, query_source=maps.query_source,
                             query_mask=maps.query_mask, key_geometry=maps.key_geometry,
                             query_geometry=maps.query_geometry, num_heads=1, query_special=maps.query_special)
    return rel_maps, {l: _modality_maps(rel_maps, l) for l in rel_maps.layers}


def evaluate(model: MultimodalModel, scenes: int = 500, seed: int = 0, batch_size: int = 32,
             scene_cfg: SceneConfig | None = None, baselines: bool = True, progress: bool = True,
             grounding: bool = True) -> dict:
    """Matching accuracy by negative type and, with `grounding`, per-head grounding (+ baselines)."""
    if grounding and model.cfg.query != "text":
        raise InputError("grounding evaluation scores text-phrase queries: it needs a model with query='text' "
                         "(grounding=False measures matching only)")
    baselines = baselines and grounding
    t0 = time.perf_counter()
    model.eval()
    cfg = scene_cfg or SceneConfig(**model.meta.get("train_config", {}).get("scene", {}))
    pool = ScenePool.build(split_seeds("test", scenes, seed), cfg)
    random_model = random_init_like(model, seed + 12345) if baselines else None
    tally = GroundingTally()
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    wins = defaultdict(lambda: [0, 0])
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
        if not grounding:
            continue
        with torch.no_grad():
            _, out = score_candidates(model, batch, [s.caption for s in group], 1, return_maps=True)
        maps = out.maps
        per_layer = {l: _modality_maps(maps, l) for l in maps.layers}
        ground_batch(tally, "model", per_layer, group, maps, gen)
        if baselines:
            ground_batch(tally, "uniform", {l: _uniform_like(per_layer[l]) for l in per_layer}, group, maps, gen)
            with torch.no_grad():
                _, rout = score_candidates(random_model, batch, [s.caption for s in group], 1, return_maps=True)
            ground_batch(tally, "random_init", {l: _modality_maps(rout.maps, l) for l in rout.maps.layers},
                         group, rout.maps, gen)
            rel_maps, rel = _relevance_maps(model, batch, [s.caption for s in group])
            ground_batch(tally, "grad_relevance", rel, group, rel_maps, gen)
    return summarise(model, tally, wins, scenes, time.perf_counter() - t0)


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
                             "energy": tally.mean(key + ("energy",)),
                             "energy_gain": tally.mean(key + ("energy_gain",)),
                             "phrases": len(tally.rows[key + ("pointing",)])})
        if not rows:
            continue
        result["heads"] += rows
        best = max(rows, key=lambda r: r["pointing"])
        result["summary"][mod] = {
            "best_head": {"layer": best["layer"], "head": best["head"]},
            "best_pointing": best["pointing"],
            "mean_energy": float(np.mean([r["energy"] for r in rows])),
            "mean_energy_gain": float(np.mean([r["energy_gain"] for r in rows])),
        }
        for source in ("uniform", "random_init", "grad_relevance"):
            keys = [k for k in tally.rows if k[0] == source and k[1] == mod and k[4] == "pointing"]
            if not keys:
                continue
            pts = [tally.mean(k) for k in keys]
            ens = [tally.mean(k[:4] + ("energy",)) for k in keys]
            result["baselines"].setdefault(mod, {})[source] = {
                "best_pointing": float(np.max(pts)), "mean_pointing": float(np.mean(pts)),
                "mean_energy": float(np.mean(ens))}
    return result


def markdown(result: dict) -> str:
    lines = [f"# Evaluation on {result['scenes']} held-out scenes", "",
             "## Matching accuracy (true caption outscores a one-attribute hard negative)", "",
             "| negative type | accuracy | pairs |", "|---|---|---|"]
    for k, v in result["matching"].items():
        lines.append(f"| {k} | {v['accuracy']:.3f} | {v['pairs']} |")
    for mod, s in result["summary"].items():
        lines += ["", f"## {mod} grounding", "",
                  f"Best head L{s['best_head']['layer']} H{s['best_head']['head']}: pointing "
                  f"{s['best_pointing']:.3f}; mean over heads of energy inside the region {s['mean_energy']:.3f} "
                  f"({s['mean_energy_gain']:.2f}x the uniform map).", "",
                  "| source | best pointing | mean pointing | mean energy |", "|---|---|---|---|"]
        for src, b in result["baselines"].get(mod, {}).items():
            lines.append(f"| {src} | {b['best_pointing']:.3f} | {b['mean_pointing']:.3f} | {b['mean_energy']:.3f} |")
        lines += ["", "| layer | head | pointing | energy | energy / uniform |", "|---|---|---|---|---|"]
        for r in result["heads"]:
            if r["modality"] == mod:
                lines.append(f"| {r['layer']} | {r['head']} | {r['pointing']:.3f} | {r['energy']:.3f} | "
                             f"{r['energy_gain']:.2f} |")
    return "\n".join(lines) + "\n"


def write_report(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / "eval.json", out_dir / "eval.md"
    j.write_text(json.dumps(result, indent=1))
    m.write_text(markdown(result))
    return j, m
