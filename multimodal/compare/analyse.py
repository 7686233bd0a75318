"""What is measured for one trained model: matching accuracy and per-head grounding on the
study's held-out scenes (`multimodal.evaluate`), then, on the first `analysis_scenes` of them
encoded once (`AnalysisSet`), per-head metrics, JS redundancy between heads and head importance
(zero-ablation, gradient, Shapley) for the matching margin. `analyse_model` returns it all with
the run's flat summary (`summary.summarise`).
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
import torch

from multimodal.analysis.importance import (ablation_importance, gradient_importance, importance_table,
                                            shapley_importance)
from multimodal.analysis.metrics import head_metric_table, js_divergence_matrix, maps_query_mask, redundancy_summary
from multimodal.compare.study import Study
from multimodal.compare.summary import HEAD_GROUNDING, head_grounding, summarise
from multimodal.data.pool import ScenePool, split_seeds
from multimodal.data.scenes import SceneConfig, hard_negative
from multimodal.evaluate import evaluate
from multimodal.model import MultimodalModel, candidate_inputs
from multimodal.train import TrainConfig, build_model, matching_loss, scene_config
from multimodal.types import AttentionMaps, ModalityTokens

BATCH = 32  # scenes per forward pass in the analysis


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rows(t: ModalityTokens, a: int, b: int) -> ModalityTokens:
    """Items a..b-1 of a batch of tokens, geometry included."""
    return t.select(slice(a, b))


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
        pool = ScenePool.build(split_seeds("test", scenes, seed), scene_cfg)
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
            pairs.append(candidate_inputs(model, {**scene_tokens, "text": text(text.preprocess(interleaved))}, 2))
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
        pair = self.pairs[b]
        shared = pair["text"].tokens.shape[0] != next(t for m, t in pair.items() if m != "text").tokens.shape[0]
        return {m: _rows(t, 2 * i, 2 * i + 2) if m == "text" or not shared else _rows(t, i, i + 1)
                for m, t in pair.items()}


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


def initial_model(tc: TrainConfig, like: MultimodalModel, attempt: int = 0) -> MultimodalModel:
    """The run's model at step 0: `build_model` seeds itself from the run's seed (and `attempt`, the start
    the run finished with after any stall restarts), so these are the very weights its training started
    from (the untrained baseline each run is paired with)."""
    return build_model(tc, tuple(like.encoders), attempt).to(like.device).eval()


def analyse_model(model: MultimodalModel, tc: TrainConfig, study: Study, progress: bool = True,
                  importance: bool = True, untrained: MultimodalModel | None = None) -> dict:
    """Evaluate one trained model and analyse its heads. Timings go under "timing" only.

    `untrained`: the grounding baseline's untrained model (default: this run's initial weights)."""
    model.eval()
    cfg = scene_config(tc)
    seed_everything(study.eval_seed)
    t0 = time.perf_counter()
    grounding = None
    if model.cfg.query == "text":
        if study.baselines and untrained is None:
            untrained = initial_model(tc, model)
        ev = evaluate(model, scenes=study.eval_scenes, seed=study.eval_seed, scene_cfg=cfg,
                      baselines=study.baselines, progress=progress, untrained=untrained)
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
        for k in HEAD_GROUNDING:
            row[head_grounding(k, g["modality"])] = g[k]
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
