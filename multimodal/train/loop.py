"""The training loop and its checkpoints: build the model, group its parameters, train.

`train` builds the model (`build_model`), freezes the encoders asked for, gives AdamW one
learning-rate scale per encoder (`parameter_groups`), generates the scene pools (or reads a
manifest's rows, `manifest_pools`), runs the curriculum and then the full scenes with the
objective of `multimodal.train.objective`, evaluates every `eval_every` steps and saves a
resumable checkpoint (`save_checkpoint` / `load_train_state`) every `checkpoint_every`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from multimodal.data.pool import ScenePool, split_seeds
from multimodal.fusion import FusionConfig
from multimodal.model import MultimodalModel, score_candidates
from multimodal.train.config import TrainConfig, curriculum_scene_config, scene_config
from multimodal.train.objective import (
    NegativeMining,
    candidate_captions,
    contrastive_loss,
    masked_word_loss,
    matching_accuracy,
    matching_loss,
)
from multimodal.types import InputError

TRAIN_STATE = "train_state"  # train_state.safetensors (optimizer tensors) + train_state.json


# ---------------------------------------------------------------------------------------
# The model, its parameter groups and a manifest's rows
# ---------------------------------------------------------------------------------------


def build_model(tc: TrainConfig, modalities: tuple[str, ...] = ("text", "image", "audio")) -> MultimodalModel:
    torch.manual_seed(tc.seed)
    specs = {"text": tc.text_encoder, "image": tc.image_encoder, "audio": tc.audio_encoder}
    model = MultimodalModel.from_specs(fusion=FusionConfig.from_dict(dict(tc.fusion)), match=tc.match,
                                       match_over=tc.match_over,
                                       **{m: (s if m in modalities else None) for m, s in specs.items()})
    if tc.phrase_queries:
        model.encoders["text"].phrase_pooling = True
    return model


def parameter_groups(model: MultimodalModel, tc: TrainConfig) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: each encoder, then fusion + match head.

    Each has its `lr_scale` (an encoder's from `encoder_lr_scales`, else `encoder_lr_scale`;
    1 for fusion and match head) and is split into matrices (with `weight_decay`) and vectors
    (none); empty groups (a frozen encoder's) are left out.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = []
    owner = {id(p): m for m, enc in model.encoders.items() for p in enc.parameters()}  # encoder params -> modality
    scales = {m: float(tc.encoder_lr_scales.get(m, tc.encoder_lr_scale)) for m in model.encoders}
    for name, scale in [*scales.items(), (None, 1.0)]:  # each encoder, then fusion + match head
        ps = [p for p in params if owner.get(id(p)) == name]
        groups += [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": tc.weight_decay, "lr_scale": scale},
                   {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    return [g for g in groups if g["params"]]


def manifest_pools(tc: TrainConfig) -> tuple[list, list, tuple[str, ...]]:
    """Training and validation rows of a manifest, and the modalities every usable row has.

    Bad rows are reported by row number and skipped; the last `val_scenes` rows (at most a
    fifth of them, and none when that is fewer than 2) are held out for validation; with
    none held out, validation reuses the training rows (and says so).
    """
    from multimodal.data.manifest import load_manifest

    rows, errors = load_manifest(tc.manifest)
    for e in errors:
        print(f"skipped: {e}")
    have = ["text"] + [m for m in ("image", "audio") if all(getattr(r, m) is not None for r in rows)]
    if len(have) < 2:
        raise InputError(f"{tc.manifest}: no modality besides text is present in every usable row; "
                         "give every row an image or every row an audio clip")
    n_val = min(tc.val_scenes, len(rows) // 5)
    if n_val < 2:
        n_val = 0
        print(f"{tc.manifest}: too few rows to hold any out; validation accuracy is on training rows")
    if len(rows) - n_val < 2:
        raise InputError(f"{tc.manifest}: {len(rows)} usable rows are too few to train on (need at least 2)")
    return rows[:len(rows) - n_val], rows[len(rows) - n_val:], tuple(have)


# ---------------------------------------------------------------------------------------
# Checkpoints with resume
# ---------------------------------------------------------------------------------------


def save_checkpoint(model, opt, step: int, tc: TrainConfig, out_dir: Path, history: list) -> None:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp, extra_meta={"train_config": tc.to_dict(), "step": step})
    tensors, meta = {}, {"step": step, "history": history, "param_groups": [], "state": {}}
    for g in opt.state_dict()["param_groups"]:
        meta["param_groups"].append({k: v for k, v in g.items()})
    for pid, st in opt.state_dict()["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    save_file(tensors, str(tmp / f"{TRAIN_STATE}.safetensors"))
    meta["torch_rng"] = torch.get_rng_state().tolist()
    (tmp / f"{TRAIN_STATE}.json").write_text(json.dumps(meta))
    if out_dir.exists():
        for p in out_dir.iterdir():
            p.unlink() if p.is_file() else None
        for p in tmp.iterdir():
            if p.is_dir():
                target = out_dir / p.name
                if target.exists():
                    for q in target.iterdir():
                        q.unlink()
                    target.rmdir()
            p.rename(out_dir / p.name)
        tmp.rmdir()
    else:
        tmp.rename(out_dir)


def load_train_state(opt, out_dir: Path) -> tuple[int, list]:
    meta = json.loads((out_dir / f"{TRAIN_STATE}.json").read_text())
    tensors = load_file(str(out_dir / f"{TRAIN_STATE}.safetensors"))
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: tensors[f"{pid}.{k}"] if v == "tensor" else v for k, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    return int(meta["step"]), list(meta["history"])


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def train(tc: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    t_start = time.perf_counter()
    torch.manual_seed(tc.seed)
    np_rng = np.random.default_rng(tc.seed)
    scfg = scene_config(tc)
    modalities = ("text", "image", "audio")
    if tc.manifest:
        train_rows, val_rows, modalities = manifest_pools(tc)
    model = build_model(tc, modalities).to(tc.device)
    for m in set(tc.freeze) & set(model.encoders):
        for p in model.encoders[m].parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(parameter_groups(model, tc), lr=tc.lr)
    step, history = 0, []
    if resume and (out_dir / f"{TRAIN_STATE}.json").is_file():
        saved = MultimodalModel.from_pretrained(out_dir)
        model.load_state_dict(saved.state_dict())
        step, history = load_train_state(opt, out_dir)
        np_rng = np.random.default_rng([tc.seed, step])
        print(f"resuming from step {step} in {out_dir}")

    if tc.manifest:
        from multimodal.data.manifest import SAMPLE_RATE as MANIFEST_RATE

        train_pool = ScenePool.from_items(model, train_rows, MANIFEST_RATE, hard_negatives=False)
        val_pool = ScenePool.from_items(model, val_rows or train_rows, MANIFEST_RATE, hard_negatives=False)
        if len(train_pool.scenes) < tc.batch_size:
            tc = replace(tc, batch_size=len(train_pool.scenes))
    else:
        train_pool = ScenePool.build(model, split_seeds("train", tc.pool_scenes, tc.seed), scfg, tc.workers,
                                     "generating training scenes")
        val_pool = ScenePool.build(model, split_seeds("val", tc.val_scenes, tc.seed), scfg, 1,
                                   "generating validation scenes")
    pool = train_pool  # the curriculum's own pool until its last step
    if tc.curriculum_steps and step < tc.curriculum_steps and not tc.manifest:  # a manifest has no curriculum
        n = min(tc.pool_scenes, tc.curriculum_steps * tc.batch_size)  # at most one pass over them
        pool = ScenePool.build(model, split_seeds("curriculum", n, tc.seed), curriculum_scene_config(tc),
                               tc.workers, "generating curriculum scenes")
    per_scene = 1 + tc.hard_negatives + tc.easy_negatives

    def lr_at(s):
        if s < tc.warmup:
            return tc.lr * (s + 1) / tc.warmup
        return tc.lr * 0.5 * (1 + math.cos(math.pi * (s - tc.warmup) / max(1, tc.steps - tc.warmup)))

    order = np_rng.permutation(len(pool.scenes))
    cursor = (step * tc.batch_size) % len(order)
    bar = tqdm(total=tc.steps, initial=step, desc="training", disable=not progress)
    ema_loss = ema_acc = None
    mining = NegativeMining(tc.negative_mining)
    while step < tc.steps:
        model.train()
        if pool is not train_pool and step >= tc.curriculum_steps:  # the curriculum is over: full scenes
            pool, order, cursor = train_pool, np_rng.permutation(len(train_pool.scenes)), 0
            bar.write(f"step {step}: curriculum done, training on the full scene config")
        if cursor + tc.batch_size > len(order):
            order, cursor = np_rng.permutation(len(pool.scenes)), 0
        idx = order[cursor:cursor + tc.batch_size].tolist()
        cursor += tc.batch_size
        captions, kinds = candidate_captions(pool, idx, tc, np_rng, mining.weights())
        scores, out = score_candidates(model, pool.batch(model, idx), captions, per_scene)
        mining.update(scores.detach(), kinds)
        loss = matching_loss(scores)
        if tc.contrastive_weight:
            loss = loss + tc.contrastive_weight * contrastive_loss(model, out.tokens, per_scene,
                                                                   tc.contrastive_temperature,
                                                                   tc.contrastive_hard_weight)
        if tc.masked_word_weight:
            loss = loss + tc.masked_word_weight * masked_word_loss(model, out.tokens, captions, per_scene,
                                                                   tc.masked_word_rate, np_rng)
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["lr_scale"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        negatives = scores[:, 1:1 + tc.hard_negatives] if tc.hard_negatives else scores[:, 1:]
        acc = float((scores[:, :1] > negatives).float().mean())
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.3f}")
        if step % tc.eval_every == 0 or step == tc.steps:
            val = matching_accuracy(model, val_pool, seed=tc.seed + 1)
            history.append({"step": step, "loss": ema_loss, "train_acc": ema_acc, **val,
                            "train_error_by_negative": dict(sorted(mining.error.items())),
                            "elapsed_s": time.perf_counter() - t_start})
            bar.write(f"step {step}: val pairwise accuracy {val['pairwise_accuracy']:.3f}, "
                      f"threshold accuracy {val['threshold_accuracy']:.3f}")
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            save_checkpoint(model, opt, step, tc, out_dir, history)
        if step in tc.snapshots:
            model.save_pretrained(out_dir / "snapshots" / f"step_{step}",
                                  extra_meta={"train_config": tc.to_dict(), "step": step})
    bar.close()
    wall = time.perf_counter() - t_start
    summary = {"steps": step, "wall_time_s": wall, "device": tc.device, "history": history,
               "config": tc.to_dict()}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
