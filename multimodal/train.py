"""`multimodal train`: caption/scene matching with hard negatives on the procedural scenes.

The objective never looks at attention maps: each scene is scored against its caption, a
few one-attribute hard negatives and an easy negative (another scene's caption); heads must
find the referents on their own. Ground truth is for evaluation only.

Config: a TOML file of `TrainConfig` fields (`[fusion]` and `[scene]` tables for those
configs) plus `--set key=value` overrides; unknown keys are refused by name.
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from multimodal.data.scenes import ONE_OBJECT, SceneConfig, hard_negative
from multimodal.fusion import FusionConfig
from multimodal.data.pool import ScenePool, split_seeds
from multimodal.model import MultimodalModel, score_candidates
from multimodal.types import MODALITIES, InputError, ModalityTokens

Tensor = torch.Tensor
TRAIN_STATE = "train_state"  # train_state.safetensors (optimizer tensors) + train_state.json


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 2600
    batch_size: int = 32
    lr: float = 1e-3  # fusion block and match head
    encoder_lr_scale: float = 1.0  # encoders train at lr * this (0.3 suited the ViT/AST encoders with self-attention)
    encoder_lr_scales: Mapping[str, float] = field(default_factory=lambda: {"audio": 0.3})  # per modality: overrides it
    weight_decay: float = 0.05
    warmup: int = 100
    hard_negatives: int = 3  # one-attribute negatives per scene per step
    easy_negatives: int = 1  # other scenes' captions per scene per step
    pool_scenes: int = 8000  # scenes generated once (features cached) and reused each epoch
    val_scenes: int = 256  # held-out scenes for the periodic evaluation
    eval_every: int = 500
    checkpoint_every: int = 500
    text_encoder: str = "bert-tiny-scenes"
    image_encoder: str = "vit-local-scenes"  # local tokens: a query gathers only what is where it looks
    audio_encoder: str = "ast-local-scenes"
    freeze_encoders: bool = False  # all of them: the same as freeze = ["text", "image", "audio"]
    freeze: tuple[str, ...] = ()  # modalities whose encoders keep their initial weights, e.g. ["text"]
    match: str = "attended"
    match_over: str = "content"  # "phrases": the soft minimum leaves out joining words ("and", "with", "then")
    phrase_queries: bool = True  # the text encoder pools each caption phrase into one query (TextEncoder.phrase_pooling)
    fusion: Mapping[str, Any] = field(default_factory=lambda: dict(
        dim=128, heads=4, layers=1, query="text", query_self_attention=True, attention="softmax",
        positional=False, compete=True, sinks=8))  # the encoders carry their own positions; sinusoids over text x key indices mislead
    scene: Mapping[str, Any] = field(default_factory=dict)
    contrastive_weight: float = 1.0  # in-batch token-level (FILIP-style) contrastive term on the encoders
    contrastive_temperature: float = 0.1
    contrastive_hard_weight: float = 0.0  # the same term over each scene's own candidates (its hard negatives)
    binding_negatives: float = 0.0  # share of colour/shape negatives whose new value another object has
    negative_mining: float = 2.0  # > 0: draw the kinds of hard negative still got wrong more often (NegativeMining)
    masked_word_weight: float = 0.0  # masked caption words predicted from the fused scene (masked_word_loss)
    masked_word_rate: float = 0.3  # share of each true caption's content tokens masked for that term
    curriculum_steps: int = 400  # first N steps: scenes with `curriculum_scene` over `scene` (not for a manifest)
    curriculum_scene: Mapping[str, Any] = field(default_factory=lambda: dict(ONE_OBJECT))
    manifest: str = ""  # a JSONL manifest of your own pairs (multimodal.data.manifest) instead of scenes
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    workers: int = 2  # processes generating the scene pool
    snapshots: tuple[int, ...] = ()  # steps after which the model is also saved to OUT/snapshots/step_N

    def __post_init__(self):
        object.__setattr__(self, "snapshots", tuple(self.snapshots))  # a TOML list is fine
        freeze = (self.freeze,) if isinstance(self.freeze, str) else tuple(self.freeze)
        if set(freeze) - set(MODALITIES):
            raise InputError(f"freeze={list(freeze)}: name modalities among {', '.join(MODALITIES)}")
        object.__setattr__(self, "freeze", MODALITIES if self.freeze_encoders else freeze)  # one mechanism
        if set(self.encoder_lr_scales) - set(MODALITIES) or any(float(v) < 0 for v in self.encoder_lr_scales.values()):
            raise InputError(f"encoder_lr_scales={dict(self.encoder_lr_scales)}: name modalities among "
                             f"{', '.join(MODALITIES)} with scales >= 0")
        if self.steps < 1 or self.batch_size < 1:
            raise InputError("steps and batch_size must be >= 1")
        if self.pool_scenes < self.batch_size:
            raise InputError(f"pool_scenes={self.pool_scenes} must be >= batch_size={self.batch_size}")
        if not 0.0 <= self.binding_negatives <= 1.0:
            raise InputError(f"binding_negatives={self.binding_negatives} is a share: use a value in [0, 1]")
        if self.curriculum_steps < 0:
            raise InputError(f"curriculum_steps={self.curriculum_steps} must be >= 0")
        if self.masked_word_weight and self.match != "bilinear":
            raise InputError("masked_word_weight scores words with the bilinear match head: set match = \"bilinear\"")
        if not 0 < self.masked_word_rate <= 1:
            raise InputError(f"masked_word_rate={self.masked_word_rate} must be in (0, 1]")
        FusionConfig.from_dict(dict(self.fusion))  # refuse bad fusion keys before anything runs
        scene_config(self)
        curriculum_scene_config(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fusion"], d["scene"] = dict(self.fusion), dict(self.scene)
        d["curriculum_scene"] = dict(self.curriculum_scene)
        d["encoder_lr_scales"] = dict(self.encoder_lr_scales)
        return d


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "smoke": {"steps": 6, "batch_size": 4, "pool_scenes": 8, "val_scenes": 8, "eval_every": 3,
              "checkpoint_every": 3, "workers": 1, "warmup": 2},
}


def _scene_config(values: Mapping[str, Any], where: str) -> SceneConfig:
    known = {f.name for f in fields(SceneConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown {where} key(s) {unknown}; valid keys: {sorted(known)}")
    return SceneConfig(**values)


def scene_config(tc: TrainConfig) -> SceneConfig:
    return _scene_config(tc.scene, "scene config")


def curriculum_scene_config(tc: TrainConfig) -> SceneConfig:
    """The scenes of the first `curriculum_steps` steps: `scene` with `curriculum_scene` over it."""
    return _scene_config({**dict(tc.scene), **dict(tc.curriculum_scene)}, "curriculum_scene")


def load_config(preset: str | None = None, path: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Preset, then the TOML file, then `key=value` overrides (dotted keys reach fusion./scene.)."""
    d: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
        d.update(PRESETS[preset])
    if path:
        try:
            d.update(tomllib.loads(Path(path).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise InputError(f"cannot read config {path}: {e}")
    base = TrainConfig()
    for key, value in (overrides or {}).items():
        top, _, sub = key.partition(".")
        if sub:
            if top not in ("fusion", "scene", "curriculum_scene"):
                raise InputError(f"unknown config key {key!r}: only fusion.*, scene.* and curriculum_scene.* "
                                 "take dotted keys")
            d[top] = {**dict(getattr(base, top) if top not in d else d[top]), sub: value}
        else:
            d[key] = value
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise InputError(f"unknown config key(s) {unknown}; valid keys: {sorted(known)}")
    for table in ("fusion", "curriculum_scene"):  # a table names changes to the default, not all of it
        if table in d:
            d[table] = {**dict(getattr(base, table)), **dict(d[table])}
    return TrainConfig(**d)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value`, value parsed as TOML when it can be (numbers, booleans), else a string."""
    if "=" not in text:
        raise InputError(f"override {text!r} must look like key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value


# ---------------------------------------------------------------------------------------
# Candidate captions, negatives and losses (the scene pool is multimodal.data.pool)
# ---------------------------------------------------------------------------------------


def candidate_captions(pool: ScenePool, idx: list[int], tc: TrainConfig, rng: np.random.Generator,
                       type_weights: Mapping[str, float] | None = None) -> tuple[list[str], list[str | None]]:
    """Per scene: [caption, hard negatives..., easy negatives...] flattened in that order, and per
    scene its negatives' kinds of change (None for an easy negative)."""
    captions, kinds = [], []
    for i in idx:
        s = pool.scenes[i]
        captions.append(s.caption)
        hard = tc.hard_negatives if pool.hard_negatives else 0
        for _ in range(hard):
            caption, _, change = hard_negative(s, rng, type_weights=type_weights, binding=tc.binding_negatives)
            captions.append(caption)
            kinds.append(change["type"])
        for _ in range(tc.hard_negatives + tc.easy_negatives - hard):
            captions.append(other_caption(pool, i, rng))
            kinds.append(None)
    return captions, kinds


class NegativeMining:
    """Running error rate per kind of hard negative; draw weights favour the kinds still got wrong.

    A kind's weight is (error + 0.02) ** strength: strength 0 draws kinds uniformly (and draws
    no differently from plain `hard_negative`), 1 in proportion to the error. Errors are
    exponential moving averages (factor 0.98 per negative seen) starting at 0.5 (chance).
    """

    def __init__(self, strength: float):
        self.strength = strength
        self.error: dict[str, float] = {}

    def weights(self) -> dict[str, float] | None:
        if not self.strength:
            return None
        return {k: (e + 0.02) ** self.strength for k, e in self.error.items()}

    def update(self, scores: Tensor, kinds: list[str | None]) -> None:
        """scores (B, per_scene), true caption first; kinds: per scene its negatives' kinds, flattened."""
        wrong = (scores[:, 1:] >= scores[:, :1]).flatten().tolist()
        for kind, w in zip(kinds, wrong):
            if kind is not None:
                self.error[kind] = 0.98 * self.error.get(kind, 0.5) + 0.02 * float(w)


def other_caption(pool: ScenePool, i: int, rng: np.random.Generator) -> str:
    """A caption of another item that differs from item i's (an easy negative)."""
    own = pool.scenes[i].caption
    if all(s.caption == own for s in pool.scenes):
        raise InputError("every item has the same caption: nothing to contrast with")
    j = int(rng.integers(len(pool.scenes)))
    while pool.scenes[j].caption == own:
        j = int(rng.integers(len(pool.scenes)))
    return pool.scenes[j].caption


def matching_loss(scores: Tensor) -> Tensor:
    """Softmax over [positive, negatives...] plus a calibrated match/no-match term."""
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1
    return F.cross_entropy(scores, target) + F.binary_cross_entropy_with_logits(scores, labels)


def contrastive_loss(model: MultimodalModel, tokens: dict[str, ModalityTokens], per_scene: int,
                     temperature: float, hard_weight: float = 0.0) -> Tensor:
    """In-batch late-interaction contrastive term (FILIP, Yao et al. 2021) on the encoder tokens.

    Each scene's true caption against every scene in the batch: a caption's content tokens,
    projected by the fusion block's input projections and L2-normalised, each take their best
    cosine match among the scene's image/audio tokens; the mean is the pair's similarity.
    Cross-entropy both ways over the batch. With `hard_weight`, also cross-entropy of each
    scene's own candidates (true caption first, then its negatives) against that scene: a
    one-attribute negative ("a red star" for a red circle) must find a worse match among the
    scene's tokens, which the batch's other scenes rarely demand. Only encoder tokens enter:
    no attention map does.
    """
    fusion = model.fusion
    text = tokens["text"]
    keep = slice(None, None, per_scene)  # the true captions and one copy of each scene

    def captions(rows: slice) -> tuple[Tensor, Tensor]:
        """Projected, L2-normalised caption tokens (N, Nt, D) and their content mask (N, Nt)."""
        t = F.normalize(fusion.input_proj["text"](text.tokens[rows]), dim=-1)
        return t, (text.mask & ~text.special)[rows]

    keys, k_mask = [], []
    for m in ("image", "audio"):
        if m in tokens:
            keys.append(F.normalize(fusion.input_proj[m](tokens[m].tokens[keep]), dim=-1))
            k_mask.append(tokens[m].mask[keep] & ~tokens[m].special[keep])
    k, k_mask = torch.cat(keys, 1), torch.cat(k_mask, 1)  # (B, Nk, D), (B, Nk)

    def pair_similarity(sim: Tensor, tm: Tensor) -> Tensor:
        """(..., Nt, Nk) token cosines -> (...,) mean over content tokens of the best key."""
        tm = tm.to(sim.dtype)
        return (sim.amax(-1) * tm).sum(-1) / tm.sum(-1).clamp_min(1)

    t, t_mask = captions(keep)  # (B, Nt, D), (B, Nt)
    sim = torch.einsum("itd,jkd->ijtk", t, k).masked_fill(~k_mask[None, :, None, :], -2.0)
    pair = pair_similarity(sim, t_mask[:, None, :])  # (B_text, B_scene)
    target = torch.arange(pair.shape[0], device=pair.device)
    logits = pair / temperature
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    if hard_weight and per_scene > 1:
        B = k.shape[0]
        t_all, m_all = captions(slice(None))  # every candidate: (B*P, Nt, D), P = per_scene
        t_own = t_all.view(B, per_scene, *t_all.shape[1:])  # (B, P, Nt, D)
        sim = torch.einsum("bptd,bkd->bptk", t_own, k).masked_fill(~k_mask[:, None, None, :], -2.0)
        own = pair_similarity(sim, m_all.view(B, per_scene, -1))  # (B, P): candidate p against scene b
        loss = loss + hard_weight * F.cross_entropy(own / temperature, torch.zeros_like(target))
    return loss


def masked_word_loss(model: MultimodalModel, tokens: dict[str, ModalityTokens], captions: list[str],
                     per_scene: int, rate: float, rng: np.random.Generator) -> Tensor:
    """Masked words of each scene's true caption, predicted from what their queries gather.

    A share `rate` of each caption's content tokens (at least one) become [MASK]; the caption
    runs through the text encoder and the fusion block against its own scene, and each masked
    position's fused query scores every vocabulary word with the match head's own bilinear form:
    <match_gathered(fused query), match_asked(input_proj(word embedding))>, so no parameter is
    added. "a red [MASK]" can only be completed from the scene: the query must find the red
    object and read its shape (the masked-language-modelling term of ALBEF, Li et al. 2021). The
    loss sees words, never an attention map or any ground truth.
    """
    text = model.encoders["text"]
    mask_id = text.tokenizer.mask_token_id
    if mask_id is None:
        raise InputError(f"masked_word_weight needs a tokenizer with a mask token; {text.spec} has none")
    batch = text.preprocess(captions[::per_scene])
    ids = batch["input_ids"]
    content = batch["attention_mask"].bool() & ~batch["special"]  # (B, N)
    chosen = torch.from_numpy(rng.random(ids.shape) < rate) & content
    for b in torch.nonzero(~chosen.any(1) & content.any(1)).flatten().tolist():  # none drawn: mask one
        options = torch.nonzero(content[b]).flatten()
        chosen[b, options[int(rng.integers(len(options)))]] = True
    targets = ids[chosen].to(model.device)  # (M,)
    batch = {**batch, "input_ids": ids.masked_fill(chosen, mask_id)}
    fused_in = {m: t.every(per_scene) for m, t in tokens.items() if m != "text"}
    fused_in["text"] = text(batch)
    fused = model.fusion(fused_in)
    words = model.match_asked(model.fusion.input_proj["text"](text.model.get_input_embeddings().weight))  # (V, D)
    gathered = model.match_gathered(fused.queries[chosen.to(fused.queries.device)])  # (M, D)
    return F.cross_entropy(gathered @ words.T / words.shape[-1] ** 0.5, targets)


@torch.no_grad()
def matching_accuracy(model: MultimodalModel, pool: ScenePool, seed: int, batch_size: int = 64) -> dict:
    """Pairwise accuracy: the true caption outscores a one-attribute hard negative (for manifest
    rows: another row's caption); plus thresholded accuracy (sigmoid 0.5) over both."""
    model.eval()
    rng = np.random.default_rng(seed)
    wins, correct, total = 0, 0, 0
    for start in range(0, len(pool.scenes), batch_size):
        idx = list(range(start, min(start + batch_size, len(pool.scenes))))
        caps = []
        for i in idx:
            negative = (hard_negative(pool.scenes[i], rng)[0] if pool.hard_negatives
                        else other_caption(pool, i, rng))
            caps += [pool.scenes[i].caption, negative]
        scores, _ = score_candidates(model, pool.batch(model, idx), caps, 2)
        wins += int((scores[:, 0] > scores[:, 1]).sum())
        correct += int((scores[:, 0] > 0).sum() + (scores[:, 1] <= 0).sum())
        total += len(idx)
    return {"pairwise_accuracy": wins / total, "threshold_accuracy": correct / (2 * total), "scenes": total}


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


def build_model(tc: TrainConfig, modalities: tuple[str, ...] = ("text", "image", "audio")) -> MultimodalModel:
    torch.manual_seed(tc.seed)
    specs = {"text": tc.text_encoder, "image": tc.image_encoder, "audio": tc.audio_encoder}
    model = MultimodalModel.from_specs(fusion=FusionConfig.from_dict(dict(tc.fusion)), match=tc.match,
                                       match_over=tc.match_over,
                                       **{m: (s if m in modalities else None) for m, s in specs.items()})
    if tc.phrase_queries:
        model.encoders["text"].phrase_pooling = True
    return model


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
    groups = []
    owner = {id(p): m for m, enc in model.encoders.items() for p in enc.parameters()}  # encoder params -> modality
    scales = {m: float(tc.encoder_lr_scales.get(m, tc.encoder_lr_scale)) for m in model.encoders}
    for name, scale in [*scales.items(), (None, 1.0)]:  # each encoder, then fusion + match head
        ps = [p for p in params if owner.get(id(p)) == name]
        groups += [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": tc.weight_decay, "lr_scale": scale},
                   {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr)
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
