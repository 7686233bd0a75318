"""The training loop and its checkpoints: build the model, group its parameters, train.

`train` builds the model (`build_model`), freezes the encoders asked for, gives AdamW one
learning-rate scale per encoder (`parameter_groups`), generates the scene pools (or reads a
manifest's rows, `manifest_pools`), runs the curriculum and then the full scenes with the
objective of `multimodal.train.objective`, evaluates every `eval_every` steps and saves a
checkpoint (`save_checkpoint`) every `checkpoint_every`.

A checkpoint holds all the loop needs to go on exactly where it stopped: weights, optimizer
state, every random generator, the data order, the curriculum's stage, the negative mining and
the running statistics. A run stopped with Ctrl-C (`TrainingInterrupted`) and resumed ends bit
for bit where an uninterrupted one does (on CPU). A checkpoint is written aside and moved into
place once complete, so a crash mid-write leaves the previous one loadable. Training writes only
into a new or empty folder, or into a training checkpoint's folder it is told to `resume` or
`overwrite`, and never deletes a file it did not write.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from multimodal.data.pool import ScenePool, split_seeds
from multimodal.data.scenes import caption_words
from multimodal.io import text_words
from multimodal.fusion import FusionConfig
from multimodal.encoders import BUILTINS
from multimodal.model import MultimodalModel, is_checkpoint, score_candidates
from multimodal.train.config import TrainConfig, curriculum_scene_config, scene_config
from multimodal.train.objective import (
    NegativeMining,
    calibrate_match_bias,
    candidate_captions,
    contrastive_loss,
    every_captions,
    masked_word_loss,
    matching_accuracy,
    matching_loss,
)
from multimodal.errors import CheckpointError
from multimodal.types import InputError

TRAIN_STATE = "train_state"  # train_state.safetensors (optimizer, data order, generators) + train_state.json
SUMMARY = "train_summary.json"  # written when the run ends
STAGING = ".checkpoint-staging"  # in the run folder: a checkpoint being written
COMMITTED = "COMMITTED"  # in STAGING once all of it is written: from then on it is the checkpoint
RESUME_FORMAT = 2  # train_state.json with "loop" (exact resume); format 1 held the optimizer and torch RNG only


# ---------------------------------------------------------------------------------------
# The model, its parameter groups and a manifest's rows
# ---------------------------------------------------------------------------------------


def init_seed(tc: TrainConfig, attempt: int = 0) -> int | list[int]:
    """The seed of a run's weights and data draws: the run's seed, or for a restart after a stall
    (`attempt` >= 1) one derived from it, so every attempt of every seed is reproducible."""
    return tc.seed if attempt == 0 else [tc.seed, attempt]


def encoder_args(tc: TrainConfig) -> dict[str, dict[str, int]]:
    """The built-in image / audio encoders' arguments that `encoder_depth` and `encoder_window` set."""
    args: dict[str, dict[str, int]] = {"image": {}, "audio": {}}
    if tc.encoder_depth >= 0:
        args["image"]["depth"] = args["audio"]["num_hidden_layers"] = tc.encoder_depth
    if tc.encoder_window >= 0:
        args["image"]["window"] = args["audio"]["time_window"] = tc.encoder_window
        args["audio"]["column_only"] = False  # the window set here is the layers' reach, a column-only built-in's too
    specs = {"image": tc.image_encoder, "audio": tc.audio_encoder}
    for m, a in args.items():
        if a and specs[m] not in BUILTINS[m]:
            raise InputError(f"encoder_depth / encoder_window set the built-in encoders' layers; {m}_encoder = "
                             f"{specs[m]!r} is not a built-in (leave them at -1 for it)")
    return {m: a for m, a in args.items() if a}


@functools.lru_cache(maxsize=None)
def own_encoder_layout(image_encoder: str, audio_encoder: str) -> tuple[int, int] | None:
    """(layers, window) that the named built-in image and audio encoders have on their own, when both are
    built-ins and agree: `encoder_depth` / `encoder_window` at these values build the very model that -1
    (the encoders' own) builds. None otherwise."""
    if image_encoder not in BUILTINS["image"] or audio_encoder not in BUILTINS["audio"]:
        return None
    # building draws CPU initial weights: leave the caller's random state alone; forking no CUDA state keeps a
    # fingerprint from initialising CUDA
    with torch.random.fork_rng(devices=[]):
        image, audio = BUILTINS["image"][image_encoder](), BUILTINS["audio"][audio_encoder]()
    own_image = (len(image.model.blocks), int(getattr(image.model, "window", 0)))
    if audio.column_only:  # a reach of its own column: no encoder_window builds it
        return None
    own_audio = (int(audio.model.config.num_hidden_layers), int(audio.time_window))
    return own_image if own_image == own_audio else None


def build_model(tc: TrainConfig, modalities: tuple[str, ...] = ("text", "image", "audio"),
                attempt: int = 0) -> MultimodalModel:
    """The run's model at step 0 (of its `attempt`-th start: see `TrainConfig.stall_restarts`)."""
    seed = init_seed(tc, attempt)
    torch.manual_seed(seed if isinstance(seed, int) else int(np.random.SeedSequence(seed).generate_state(1)[0]))
    specs = {"text": tc.text_encoder, "image": tc.image_encoder, "audio": tc.audio_encoder}
    model = MultimodalModel.from_specs(fusion=FusionConfig.from_dict(dict(tc.fusion)), match=tc.match,
                                       match_over=tc.match_over, match_order=tc.match_order == "train" and tc.can_read_order,
                                       encoder_args=encoder_args(tc),
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
# Checkpoints: written atomically, read back for an exact resume
# ---------------------------------------------------------------------------------------


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `train` after a whole step, whose checkpoint is saved in `out_dir`.

    A KeyboardInterrupt, so a caller that does not know it still stops; `train(..., resume=True)`
    on `out_dir` goes on exactly where it stopped.
    """

    def __init__(self, step: int, steps: int, out_dir: str | Path):
        self.step, self.steps, self.out_dir = step, steps, Path(out_dir)
        super().__init__(f"interrupted after step {step} of {steps}; its checkpoint is in {out_dir}: "
                         "train again with resume=True (--resume) to go on")


def _rng_state(device: str) -> dict[str, torch.Tensor]:
    """torch's global generators (CPU, and CUDA when training there): dropout draws from them.
    The loop's numpy Generator is saved with the loop's state; python's `random` and numpy's
    global generator are drawn from nowhere in training, so they are neither saved nor touched."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if str(device).startswith("cuda"):
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def _set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"] if "rng.torch" in tensors
                        else torch.tensor(meta["torch_rng"], dtype=torch.uint8))  # format 1: a JSON list
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (where the system allows it for folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _move(src: Path, dst: Path) -> None:
    """src over dst, file by file (each os.replace atomic); a folder's other files stay."""
    if src.is_dir():
        dst.mkdir(exist_ok=True)
        for p in sorted(src.iterdir()):
            _move(p, dst / p.name)
        src.rmdir()
    else:
        os.replace(src, dst)


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Move a committed checkpoint over the previous one, the training state last."""
    for p in sorted(staging.iterdir(), key=lambda p: (p.name == f"{TRAIN_STATE}.json", p.name)):
        if p.name != COMMITTED:
            _move(p, out_dir / p.name)
    _fsync(out_dir)
    (staging / COMMITTED).unlink()
    staging.rmdir()


def _recover(out_dir: Path) -> None:
    """A checkpoint write cut short by a crash: finished if it was complete, else dropped (the
    previous checkpoint stands)."""
    staging = out_dir / STAGING
    if (staging / COMMITTED).is_file():
        _move_into_place(staging, out_dir)
    elif staging.exists():
        shutil.rmtree(staging)  # our own unfinished write, never a user's file


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(model, opt, step: int, tc: TrainConfig, out_dir: Path, history: list,
                    loop: dict | None = None, loop_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """The checkpoint of `step` in out_dir, written atomically: all of it or, after a crash, none.

    model.safetensors, config.json and tokenizer/ (the model), train_state.safetensors and
    train_state.json (optimizer state, every random generator, and `loop` / `loop_tensors`: the
    loop's own state). All of it is written into out_dir/.checkpoint-staging, flushed, marked
    complete, then moved over the previous files; until the mark the previous checkpoint is
    untouched, after it `_recover` finishes the move. No other file of out_dir is touched.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _recover(out_dir)
    staging = out_dir / STAGING
    model.save_pretrained(staging, extra_meta={"train_config": tc.to_dict(), "step": step})
    sd = opt.state_dict()
    meta = {"format": RESUME_FORMAT, "step": step, "history": history, "param_groups": sd["param_groups"],
            "state": {}}
    tensors = {}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    rng_tensors = _rng_state(tc.device)
    if loop is not None:
        meta["loop"] = loop
    save_file({**tensors, **rng_tensors, **(loop_tensors or {})}, str(staging / f"{TRAIN_STATE}.safetensors"))
    (staging / f"{TRAIN_STATE}.json").write_text(json.dumps(meta))
    for p in staging.rglob("*"):
        _fsync(p)
    (staging / COMMITTED).write_text(f"{step}\n")
    _fsync(staging / COMMITTED)
    _fsync(staging)
    _move_into_place(staging, out_dir)


def _read_train_state(out_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        meta = json.loads((out_dir / f"{TRAIN_STATE}.json").read_text())
        tensors = load_file(str(out_dir / f"{TRAIN_STATE}.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"the training state in {out_dir} is damaged ({e})",
                              "resume from a copy of the run, or pass --overwrite to train again from step 0") from None
    return meta, tensors


def _load_optimizer(opt, meta: dict, tensors: dict[str, torch.Tensor], out_dir: Path) -> None:
    state = {int(pid): {k: tensors[f"{pid}.{k}"] if v == "tensor" else v for k, v in st.items()}
             for pid, st in meta["state"].items()}
    try:
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"the optimizer state in {out_dir} does not fit this config's trainable parameters ({e})",
                              "resume with the config the run was trained with (freeze, encoders, fusion)") from None


def load_train_state(opt, out_dir: Path) -> tuple[int, list]:
    """Load out_dir's optimizer state into `opt` and restore the random generators: (step, history)."""
    meta, tensors = _read_train_state(Path(out_dir))
    _load_optimizer(opt, meta, tensors, Path(out_dir))
    _set_rng_state(meta, tensors)
    return int(meta["step"]), list(meta["history"])


def _save_snapshot(model, tc: TrainConfig, step: int, out_dir: Path) -> None:
    """The model after `step` in out_dir/snapshots/step_N, written aside and renamed into place."""
    target = out_dir / "snapshots" / f"step_{step}"
    partial = target.with_name(f".{target.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)  # our own unfinished write
    model.save_pretrained(partial, extra_meta={"train_config": tc.to_dict(), "step": step})
    if target.exists():
        shutil.rmtree(target)  # this run's own step, written before a crash it resumed from (or --overwrite)
    partial.rename(target)


# ---------------------------------------------------------------------------------------
# The folders training may write into, and Ctrl-C
# ---------------------------------------------------------------------------------------


def _check_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> tuple[dict, dict] | None:
    """Refuse a folder training would damage; with `resume`, the training state to go on from.

    New or empty: train. A training checkpoint: `resume` goes on from it, `overwrite` trains
    again over it (its files are replaced as the new run writes its own); neither is refused.
    A model without training state: only `overwrite`. Any other files: refused, never written
    over nor deleted.
    """
    if resume and overwrite:
        raise InputError("--resume goes on from the checkpoint in the folder and --overwrite trains again over it: "
                         "choose one")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file, not a folder: choose another --out")
    if out_dir.is_dir():
        _recover(out_dir)
    names = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    has_model = is_checkpoint(out_dir)
    if has_model and (out_dir / f"{TRAIN_STATE}.json").is_file():
        if resume:
            return _read_train_state(out_dir)
        if overwrite:
            return None
        try:
            step = f" (step {json.loads((out_dir / f'{TRAIN_STATE}.json').read_text())['step']})"
        except (OSError, ValueError, KeyError, TypeError):
            step = ""
        raise InputError(f"{out_dir} already holds a training checkpoint{step}: pass --resume to go on from it, "
                         "--overwrite to train again over it, or choose another --out")
    if has_model:
        if overwrite:
            return None
        raise InputError(f"{out_dir} holds a model but no training state ({TRAIN_STATE}.json)"
                         f"{', so there is nothing to resume' if resume else ''}: pass --overwrite to train "
                         "again over it, or choose another --out")
    if names:
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        if resume:
            raise InputError(f"nothing to resume: {out_dir} holds no training checkpoint, only other files ({listed}); "
                             "point --out at the folder of the run to resume")
        raise InputError(f"{out_dir} holds files that are not a training checkpoint ({listed}): training writes only "
                         "into a new or empty folder, or into a checkpoint's with --resume or --overwrite, and never "
                         "over other files; choose another --out")
    if resume:
        raise InputError(f"nothing to resume: {out_dir} {'is empty' if out_dir.is_dir() else 'does not exist'}; "
                         "leave out --resume to start a new run there")
    return None


@contextmanager
def _deferred_sigint():
    """Within: a first Ctrl-C (SIGINT) only asks the loop to stop after the current step (yielded:
    has it been asked?); a second raises KeyboardInterrupt at once. Only where Python's default
    handler is in place: the main thread, with SIGINT neither ignored nor handled by the caller."""
    asked = []

    def handler(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)
        os.write(2, b"\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again: quit at once, "
                    b"without saving)\n")  # not print: the handler may run inside a write to stderr

    ours = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if ours:
        signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(asked)
    finally:
        if ours:
            signal.signal(signal.SIGINT, signal.default_int_handler)


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def training_step(model: MultimodalModel, opt: torch.optim.Optimizer, pool: ScenePool, idx: list[int],
                  tc: TrainConfig, rng: np.random.Generator, mining: NegativeMining, lr: float,
                  share_scene: bool = True, every: tuple[str, ...] = ()) -> tuple[float, float]:
    """One optimiser step on the pool's scenes `idx` at learning rate `lr` (times each group's scale):
    (loss, share of hard negatives the true caption outscored). Draws the candidate captions from
    `rng` and updates `mining`. Each scene is encoded and projected once for all its candidates;
    `share_scene=False` repeats its tokens per candidate instead (the same loss; for benchmarks).
    `every` (kinds of change; `TrainConfig.curriculum_every` in the curriculum): each scene also meets
    every change of those kinds, scored with its drawn candidates and trained in a second matching
    term (true caption against those changes); neither the mining nor the returned share counts them,
    and the returned loss leaves that term out, so the progress line and the stall check
    (`stall_loss`) read the same objective as without it."""
    per_scene = 1 + tc.hard_negatives + tc.easy_negatives
    captions, kinds, keys = candidate_captions(pool, idx, tc, rng, mining)
    extra, valid = every_captions(pool, idx, every) if every else ([], None)
    n_extra = len(extra) // len(idx)  # each scene's drawn candidates, then its every-change ones
    scored = [c for b in range(len(idx))
              for c in captions[b * per_scene:(b + 1) * per_scene] + extra[b * n_extra:(b + 1) * n_extra]]
    scores, out = score_candidates(model, pool.batch(model, idx), scored, per_scene + n_extra,
                                   share_scene=share_scene)
    scores, every_scores = scores[:, :per_scene], scores[:, per_scene:]
    mining.update(scores.detach(), kinds, keys)
    loss = matching_loss(scores)
    tokens, every_loss = out.tokens, 0.0
    if n_extra:
        every_loss = matching_loss(torch.cat([scores[:, :1], every_scores], 1),
                                   F.pad(valid, (1, 0), value=True).to(scores.device))
        drawn = [b * (per_scene + n_extra) + k for b in range(len(idx)) for k in range(per_scene)]
        tokens = {**tokens, "text": tokens["text"].select(drawn)}  # the other terms: the drawn candidates only
    if tc.contrastive_weight:
        loss = loss + tc.contrastive_weight * contrastive_loss(model, tokens, per_scene, tc.contrastive_temperature,
                                                               tc.contrastive_hard_weight, tc.contrastive_per_modality)
    if tc.masked_word_weight:
        loss = loss + tc.masked_word_weight * masked_word_loss(model, tokens, captions, per_scene,
                                                               tc.masked_word_rate, rng)
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    opt.zero_grad(set_to_none=True)
    (loss + every_loss).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    negatives = scores[:, 1:1 + tc.hard_negatives] if tc.hard_negatives else scores[:, 1:]
    return loss.item(), float((scores[:, :1] > negatives).float().mean())



def heartbeat_every(steps: int) -> int:
    """With the progress bar off (a study's worker, a log file), a plain line every this many steps: 20 a run."""
    return max(1, steps // 20)


def _heartbeat_line(step: int, steps: int, loss: float, acc: float, elapsed: float, done: int,
                    recent: tuple[float, int] | None = None) -> str:
    """'step 160/1600: loss 3.214, train acc 0.612; 1.40 s a step over the last 80 (1.21 since the start), about
    34 min to go'. `elapsed` / `done`: the wall time and steps since this start (or resume) began, evaluations and
    checkpoints included; `recent`: the same over the steps since the last line. The estimate uses the recent
    rate when there is one: the curriculum's small scenes make the first steps faster than the rest."""
    rate = elapsed / max(1, done)
    if recent and recent[1] > 0 and recent[1] < done:
        last = recent[0] / recent[1]
        said, left = f"{last:.2f} s a step over the last {recent[1]} ({rate:.2f} since the start)", last * (steps - step)
    else:
        said, left = f"{rate:.2f} s a step", rate * (steps - step)
    eta = f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
    return f"step {step}/{steps}: loss {loss:.3f}, train acc {acc:.3f}; {said}, about {eta} to go"


def train(tc: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
          overwrite: bool = False) -> dict:
    """Train from step 0, or with `resume` go on from out_dir's checkpoint exactly where it stopped.

    out_dir must be new or empty, or hold a training checkpoint and be given `resume` or
    `overwrite` (`_check_out_dir`). Ctrl-C (SIGINT) lets the current step finish, saves its
    checkpoint and raises `TrainingInterrupted`; a second Ctrl-C stops at once, dropping the
    unfinished step (the last checkpoint stands). Returns the run's summary, also written to
    out_dir/train_summary.json.
    """
    out_dir = Path(out_dir)
    resumed = _check_out_dir(out_dir, resume, overwrite)  # before any work
    t_start = time.perf_counter()
    scfg = scene_config(tc)
    modalities = ("text", "image", "audio")
    if tc.manifest:
        train_rows, val_rows, modalities = manifest_pools(tc)
    words = (sorted({w for r in train_rows for w in text_words(r.caption)}) if tc.manifest
             else caption_words())  # what the app and `maps` call new words

    def start(attempt: int):
        """Fresh weights, optimizer and data generator for the `attempt`-th start of the run."""
        np_rng = np.random.default_rng(init_seed(tc, attempt))
        model = build_model(tc, modalities, attempt).to(tc.device)
        model.meta["caption_words"] = words
        for m in set(tc.freeze) & set(model.encoders):
            for p in model.encoders[m].parameters():
                p.requires_grad_(False)
        return model, torch.optim.AdamW(parameter_groups(model, tc), lr=tc.lr), np_rng

    attempt, restarts = 0, []  # restarts after a stall (TrainConfig.stall_restarts)
    model, opt, np_rng = start(0)
    if tc.match_order != "off" and not tc.can_read_order:
        print(f"note: match_order = {tc.match_order} skipped: event order is read off text queries' maps into a "
              "soft minimum, and this model has latent queries or match = mean")
    step, history, loop = 0, [], None
    if resumed:
        meta, tensors = resumed
        saved = MultimodalModel.from_pretrained(out_dir)
        if saved.match_order and not model.match_order:  # saved after its last step with match_order = "after"
            model.enable_match_order()
        try:
            model.load_state_dict(saved.state_dict())
        except RuntimeError as e:
            raise CheckpointError(f"the checkpoint in {out_dir} is another model than this config builds "
                                  f"({str(e).splitlines()[0]})", "resume with the config it was trained with") from None
        _load_optimizer(opt, meta, tensors, out_dir)
        step, history, loop = int(meta["step"]), list(meta["history"]), meta.get("loop")
        if loop:
            attempt, restarts = int(loop.get("attempt", 0)), list(loop.get("restarts", []))
        print(f"resuming from step {step} in {out_dir}" + (f" (start {attempt + 1}, after a stall)" if attempt else ""))
        before, now = saved.meta.get("train_config", {}), json.loads(json.dumps(tc.to_dict()))
        changed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in now if k in before and before[k] != now[k]]
        if changed:
            print(f"note: resuming with changed settings ({', '.join(changed)}): the run will differ from an "
                  "uninterrupted one with either config")

    if tc.manifest:
        from multimodal.data.manifest import SAMPLE_RATE as MANIFEST_RATE

        train_pool = ScenePool.from_items(train_rows, MANIFEST_RATE, hard_negatives=False)
        val_pool = ScenePool.from_items(val_rows or train_rows, MANIFEST_RATE, hard_negatives=False)
        if len(train_pool.scenes) < tc.batch_size:
            tc = replace(tc, batch_size=len(train_pool.scenes))
    else:
        train_pool = ScenePool.build(split_seeds("train", tc.pool_scenes, tc.seed), scfg, tc.workers,
                                     "generating training scenes", progress)
        val_pool = ScenePool.build(split_seeds("val", tc.val_scenes, tc.seed), scfg)
    # the curriculum's own pool until its last step (a manifest has none)
    has_curriculum = bool(tc.curriculum_steps) and not tc.manifest
    in_curriculum = has_curriculum and (loop["pool"] == "curriculum" if loop else step < tc.curriculum_steps)
    pool = train_pool
    curriculum_pool = None
    if has_curriculum:
        n = min(tc.pool_scenes, tc.curriculum_steps * tc.batch_size)  # at most one pass over them
        curriculum_pool = ScenePool.build(split_seeds("curriculum", n, tc.seed), curriculum_scene_config(tc),
                                          tc.workers if in_curriculum and step < tc.curriculum_steps else 0,
                                          "generating curriculum scenes", progress)
    if in_curriculum and step < tc.curriculum_steps:
        pool = curriculum_pool

    def lr_at(s):
        if s < tc.warmup:
            return tc.lr * (s + 1) / tc.warmup
        return tc.lr * 0.5 * (1 + math.cos(math.pi * (s - tc.warmup) / max(1, tc.steps - tc.warmup)))

    mining = NegativeMining(tc.negative_mining, tc.mining_counts, tc.mining_values)
    ema_loss = ema_acc = None
    if loop:  # exact resume: the data order, the generators and the running statistics as saved
        order, cursor = tensors["data.order"].numpy(), int(loop["cursor"])
        if len(order) and int(order.max()) >= len(pool.scenes):
            raise CheckpointError(f"the checkpoint in {out_dir} draws from {len(order)} scenes, this config's pool "
                                  f"has {len(pool.scenes)}",
                                  "resume with the pool_scenes (or manifest) it was trained with")
        np_rng.bit_generator.state = loop["np_rng"]
        mining.error = dict(loop["mining"])
        mining.value_error = dict(loop.get("mining_values", {}))
        ema_loss, ema_acc = loop["ema_loss"], loop["ema_acc"]
        t_start -= loop["elapsed_s"]
        _set_rng_state(meta, tensors)
    else:
        if resumed:  # format 1
            print(f"note: {out_dir} was written before checkpoints kept the data order and random draws: they "
                  "restart from the seed, so the run will differ from an uninterrupted one")
            np_rng = np.random.default_rng([tc.seed, step])
            _set_rng_state(meta, tensors)
        order = np_rng.permutation(len(pool.scenes))
        cursor = (step * tc.batch_size) % len(order)

    stale_summary = (out_dir / SUMMARY).exists()  # of the finished run this one resumes or overwrites

    def checkpoint():
        nonlocal stale_summary
        state = {"cursor": cursor, "pool": "curriculum" if in_curriculum else "train",
                 "np_rng": np_rng.bit_generator.state, "mining": mining.error, "mining_values": mining.value_error,
                 "ema_loss": ema_loss, "ema_acc": ema_acc, "elapsed_s": time.perf_counter() - t_start,
                 "attempt": attempt, "restarts": restarts}
        save_checkpoint(model, opt, step, tc, out_dir, history, state,
                        {"data.order": torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64))})
        if stale_summary:  # it no longer describes the checkpoint; the run's own is written when it ends
            (out_dir / SUMMARY).unlink(missing_ok=True)
            stale_summary = False

    saved_step = step if resumed else None  # the step of the checkpoint on disk
    setup_s = None  # from the start to the first step: model, pools, resume
    heartbeat, first, t_loop = heartbeat_every(tc.steps), step, time.perf_counter()  # a line now and then, bar off
    last_line = (t_loop, step)  # the time and step of the last heartbeat line
    with (tqdm(total=tc.steps, initial=step, desc="training", disable=not progress) as bar,
          _deferred_sigint() as interrupted):
        while step < tc.steps:
            model.train()
            if in_curriculum and step >= tc.curriculum_steps:  # the curriculum is over: full scenes
                pool, order, cursor = train_pool, np_rng.permutation(len(train_pool.scenes)), 0
                in_curriculum = False
                bar.write(f"step {step}: curriculum done, training on the full scene config")
            if cursor + tc.batch_size > len(order):
                order, cursor = np_rng.permutation(len(pool.scenes)), 0
            idx = order[cursor:cursor + tc.batch_size].tolist()
            cursor += tc.batch_size
            if setup_s is None:
                setup_s = time.perf_counter() - t_start
            loss, acc = training_step(model, opt, pool, idx, tc, np_rng, mining, lr_at(step),
                                      every=tc.curriculum_every if in_curriculum else ())
            step += 1
            ema_loss = loss if ema_loss is None else 0.95 * ema_loss + 0.05 * loss
            ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.3f}")
            if not progress and step % heartbeat == 0 and step < tc.steps:
                now = time.perf_counter()
                since = (now - last_line[0], step - last_line[1]) if step > last_line[1] else None  # None: restarted
                print(_heartbeat_line(step, tc.steps, ema_loss, ema_acc, now - t_loop, step - first, since))
                last_line = (now, step)
            # before this step's evaluation and checkpoint: a stalled start is neither evaluated nor saved, so
            # a checkpoint on disk never holds a start past its stall check (a resume would skip the restart)
            if (tc.stall_restarts and step == tc.stall_step and ema_loss > tc.stall_loss
                    and attempt < tc.stall_restarts):
                attempt += 1
                restarts.append({"step": step, "loss": ema_loss, "start": attempt + 1})
                bar.write(f"step {step}: loss {ema_loss:.3f} is above {tc.stall_loss}: this start has stalled "
                          f"(stall_step / stall_loss). Restarting from step 0 with fresh weights and data draws "
                          f"(start {attempt + 1} of at most {tc.stall_restarts + 1})")
                model, opt, np_rng = start(attempt)
                mining = NegativeMining(tc.negative_mining, tc.mining_counts, tc.mining_values)
                step, history, ema_loss, ema_acc = 0, [], None, None
                first, t_loop = 0, time.perf_counter()
                last_line = (t_loop, 0)
                in_curriculum = has_curriculum
                pool = curriculum_pool if in_curriculum else train_pool
                order, cursor = np_rng.permutation(len(pool.scenes)), 0
                bar.reset(total=tc.steps)
                saved_step = None
                continue
            if step == tc.steps and tc.calibrate:  # before the last evaluation and checkpoint, which keep it
                c = model.meta["match_calibration"] = calibrate_match_bias(
                    model, val_pool, seed=tc.seed + 2, repeat=tc.repeat_negatives)
                if c:  # {} for a manifest: nothing to calibrate against
                    bar.write(f"step {step}: match threshold calibrated on {c['scenes']} validation scenes: logit "
                              f"shift {c['shift']:+.3f}, balanced accuracy {c['balanced_accuracy_before']:.3f} -> "
                              f"{c['balanced_accuracy_after']:.3f}")
            if step == tc.steps and tc.match_order == "after" and tc.can_read_order and not model.match_order:
                model.enable_match_order()
                bar.write(f"step {step}: event order switched on (match_order = after): each '<phrase> then <phrase>' "
                          "asks that the second phrase's audio attention be centred later than the first's")
            if step % tc.eval_every == 0 or step == tc.steps:
                val = matching_accuracy(model, val_pool, seed=tc.seed + 1)
                history.append({"step": step, "loss": ema_loss, "train_acc": ema_acc, **val,
                                "train_error_by_negative": dict(sorted(mining.error.items())),
                                **({"train_error_worst_changes": dict(sorted(
                                    mining.value_error.items(), key=lambda kv: -kv[1])[:8])} if mining.values else {}),
                                "elapsed_s": time.perf_counter() - t_start})
                bar.write(f"step {step}: val pairwise accuracy {val['pairwise_accuracy']:.3f}, "
                          f"threshold accuracy {val['threshold_accuracy']:.3f}")
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                checkpoint()
                saved_step = step
            if step in tc.snapshots:
                _save_snapshot(model, tc, step, out_dir)
            if interrupted() and step < tc.steps:  # Ctrl-C during this step: it is whole, keep it
                if saved_step != step:
                    checkpoint()
                raise TrainingInterrupted(step, tc.steps, out_dir)
    wall = time.perf_counter() - t_start
    summary = {"steps": step, "wall_time_s": wall, "setup_s": setup_s, "device": tc.device, "history": history,
               "restarts": restarts, "calibration": model.meta.get("match_calibration"), "config": tc.to_dict()}
    _write_atomic(out_dir / SUMMARY, json.dumps(summary, indent=1))
    return summary
