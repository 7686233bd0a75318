"""What a training run is told: `TrainConfig`, the presets, and how a config is read.

A config is a preset, then a TOML file of `TrainConfig` fields (`[fusion]`, `[scene]` and
`[curriculum_scene]` tables for those configs), then `key=value` overrides whose dotted keys
reach into those tables (`apply_overrides`); unknown keys are refused by name, and
`TrainConfig` checks its values before anything runs.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch

from multimodal.data.scenes import CHANGE_TYPES, ONE_OBJECT, REPEAT, SceneConfig
from multimodal.fusion import FusionConfig
from multimodal.types import MODALITIES, InputError, loose_switch


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 1600
    batch_size: int = 32
    lr: float = 1e-3  # fusion block and match head
    encoder_lr_scale: float = 1.0  # encoders train at lr * this (0.3 suited the ViT/AST encoders with self-attention)
    encoder_lr_scales: Mapping[str, float] = field(default_factory=lambda: {"audio": 0.3})  # per modality: overrides it
    weight_decay: float = 0.05
    warmup: int = 100
    hard_negatives: int = 3  # one-attribute negatives per scene per step
    easy_negatives: int = 1  # other scenes' captions per scene per step
    pool_scenes: int = 8000  # scenes drawn from, each generated once (when first drawn) and reused each epoch
    val_scenes: int = 256  # held-out scenes for the periodic evaluation
    eval_every: int = 500
    checkpoint_every: int = 500
    text_encoder: str = "bert-tiny-scenes"
    # 2 windowed ViT blocks over 8-px cells, 2 AST layers attending within their own time column over 10x10
    # patches that do not overlap (40 mel, 0.1 s columns): transformer encoders whose tokens stay about where
    # they are
    # (assets/MODEL_CARD.md); the `local` preset has no encoder layers at all
    image_encoder: str = "vit-window-fine-wide-scenes"
    audio_encoder: str = "ast-column-mel40-scenes"
    # -1: the built-ins' own; N >= 0: the image and audio built-ins get N transformer blocks / layers, and
    # attend within N cells / time columns (0: globally). For the convolution-stem built-ins (vit-*-scenes
    # but vit-tiny-scenes, ast-*-scenes): what the encoder-depth study varies
    encoder_depth: int = -1
    encoder_window: int = -1
    freeze_encoders: bool = False  # all of them: the same as freeze = ["text", "image", "audio"]
    freeze: tuple[str, ...] = ()  # modalities whose encoders keep their initial weights, e.g. ["text"]
    match: str = "attended"
    match_over: str = "content"  # "phrases": the soft minimum leaves out joining words ("and", "with", "then")
    # each "<phrase> then <phrase>" also asks that the second phrase's audio attention be centred later than the
    # first's (MultimodalModel.match_order): event order read off the maps. "after": switched on once the last
    # step is done (and the threshold calibrated), with its initial scale and bias; "train": on from step 0,
    # its scale and bias learned; "off". Both are skipped for a model that cannot read it (latent queries,
    # match = "mean"; the training log says so)
    match_order: str = "train"
    # hard negatives may also name one event of a two-event caption twice ("a chirp then a chirp", one chirp
    # heard: data.scenes.REPEAT), drawn like the other kinds (and mined); the calibration sees them too
    repeat_negatives: bool = True
    phrase_queries: bool = True  # the text encoder pools each caption phrase into one query (TextEncoder.phrase_pooling)
    # positional=False: the encoders carry their own positions; the fusion block's own sinusoids change nothing
    # beyond seed noise (multimodal/studies/reports/positional)
    fusion: Mapping[str, Any] = field(default_factory=lambda: dict(
        dim=128, heads=4, layers=2, query="text", query_self_attention=True, attention="softmax",
        positional=False, compete=True, sinks=8))
    scene: Mapping[str, Any] = field(default_factory=dict)
    captions: str = "both"  # what captions name: "image" (objects only), "audio" (events only) or "both"
    contrastive_weight: float = 1.0  # in-batch token-level (FILIP-style) contrastive term on the encoders
    contrastive_temperature: float = 0.1
    contrastive_hard_weight: float = 0.0  # the same term over each scene's own candidates (its hard negatives)
    contrastive_per_modality: bool = True  # the term per modality (image, audio) rather than over both at once
    binding_negatives: float = 0.0  # share of colour/shape negatives whose new value another object has
    negative_mining: float = 2.0  # > 0: draw the kinds of hard negative still got wrong more often (NegativeMining)
    # what mining counts as wrong: "rank" (scored at or above the true caption) or "match" (that, or p > 0.5)
    mining_counts: str = "rank"
    # mining also weighs the changes within a kind by their own running error (a star called a cross is got
    # wrong far more often than a star called a circle): NegativeMining.values
    mining_values: bool = False
    masked_word_weight: float = 0.0  # masked caption words predicted from the fused scene (masked_word_loss)
    masked_word_rate: float = 0.3  # share of each true caption's content tokens masked for that term
    curriculum_steps: int = 400  # first N steps: scenes with `curriculum_scene` over `scene` (not for a manifest)
    curriculum_scene: Mapping[str, Any] = field(default_factory=lambda: dict(ONE_OBJECT))
    # kinds of one-attribute change (e.g. ["shape"]) of which each curriculum scene also meets every change
    # its caption allows, in a second matching term beside its drawn candidates (`every_captions`)
    curriculum_every: tuple[str, ...] = ()
    manifest: str = ""  # a JSONL manifest of your own pairs (multimodal.data.manifest) instead of scenes
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    workers: int = 0  # 0: each scene is generated when first drawn; N: the whole pool up front, in N processes
    snapshots: tuple[int, ...] = ()  # steps after which the model is also saved to OUT/snapshots/step_N
    # a start whose loss (running mean) is still above stall_loss at stall_step has stalled: the run starts
    # again from fresh weights and data draws (init_seed), at most stall_restarts times; the log says so
    # the default's loss at stall_step 200: 3.8 in a start that grounds (seed 1); one whose image tokens never
    # learn adds about half the image contrastive term's gap to chance (2.3 -> 3.5-3.7 in eval), about 4.4
    stall_step: int = 200
    stall_loss: float = 4.1
    stall_restarts: int = 2
    # after the last step: shift the match logit so p = 0.5 best separates the validation scenes' true
    # captions from their one-attribute negatives (calibrate_match_bias; rankings and maps unchanged)
    calibrate: bool = True

    def __post_init__(self):
        if name := loose_switch(self):
            raise InputError(f"{name}={getattr(self, name)!r} is a switch: write true or false (lower case, as TOML "
                             "does)")
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
        if self.workers < 0:
            raise InputError(f"workers={self.workers} must be >= 0 (0: generate each scene when first drawn)")
        if self.pool_scenes < self.batch_size:
            raise InputError(f"pool_scenes={self.pool_scenes} must be >= batch_size={self.batch_size}")
        if not 0.0 <= self.binding_negatives <= 1.0:
            raise InputError(f"binding_negatives={self.binding_negatives} is a share: use a value in [0, 1]")
        if self.encoder_depth < -1 or self.encoder_window < -1:
            raise InputError(f"encoder_depth={self.encoder_depth} and encoder_window={self.encoder_window} must be "
                             ">= 0 (or -1: the built-in encoders' own)")
        if self.stall_restarts < 0 or self.stall_step < 1:
            raise InputError(f"stall_restarts={self.stall_restarts} must be >= 0 and stall_step={self.stall_step} >= 1")
        if self.curriculum_steps < 0:
            raise InputError(f"curriculum_steps={self.curriculum_steps} must be >= 0")
        every = (self.curriculum_every,) if isinstance(self.curriculum_every, str) else tuple(self.curriculum_every)
        if set(every) - {*CHANGE_TYPES, REPEAT} or len(set(every)) < len(every):
            raise InputError(f"curriculum_every={list(every)}: name kinds of change among "
                             f"{', '.join((*CHANGE_TYPES, REPEAT))}, each once")
        object.__setattr__(self, "curriculum_every", every)
        if self.masked_word_weight and self.match != "bilinear":
            raise InputError("masked_word_weight scores words with the bilinear match head: set match = \"bilinear\"")
        if not 0 < self.masked_word_rate <= 1:
            raise InputError(f"masked_word_rate={self.masked_word_rate} must be in (0, 1]")
        if self.mining_counts not in MINING_COUNTS:
            raise InputError(f"mining_counts={self.mining_counts!r}: choose one of {', '.join(MINING_COUNTS)}")
        if self.match_order not in MATCH_ORDER:
            raise InputError(f"match_order={self.match_order!r}: choose one of {', '.join(MATCH_ORDER)}")
        if self.captions not in CAPTIONS:
            raise InputError(f"captions={self.captions!r}: choose one of {', '.join(CAPTIONS)}")
        FusionConfig.from_dict(dict(self.fusion))  # refuse bad fusion keys before anything runs
        scene_config(self)
        curriculum_scene_config(self)

    @property
    def can_read_order(self) -> bool:
        """The model can read event order off its maps (`match_order`): text queries, a soft-minimum match."""
        return self.match != "mean" and FusionConfig.from_dict(dict(self.fusion)).query == "text"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fusion"], d["scene"] = dict(self.fusion), dict(self.scene)
        d["curriculum_scene"] = dict(self.curriculum_scene)
        d["encoder_lr_scales"] = dict(self.encoder_lr_scales)
        return d


MATCH_ORDER = ("off", "after", "train")
MINING_COUNTS = ("rank", "match")  # NegativeMining.counts

# what `captions` leaves out of every caption (over `scene` and `curriculum_scene`): the task-variety study
CAPTIONS: dict[str, dict[str, int]] = {"both": {}, "image": {"max_mentioned_events": 0},
                                       "audio": {"max_mentioned_objects": 0}}

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # the embedded default before 2026-12-03 (assets/local): local-token encoders with no self-attention
    # layers, one fusion layer, 2600 steps, no calibration
    "local": {"steps": 2600, "image_encoder": "vit-local-scenes", "audio_encoder": "ast-local-scenes",
              "fusion": {"layers": 1}, "calibrate": False, "stall_step": 300, "stall_loss": 3.5,
              "contrastive_per_modality": False, "match_order": "off", "repeat_negatives": False},
    "smoke": {"steps": 6, "batch_size": 4, "pool_scenes": 8, "val_scenes": 8, "eval_every": 3,
              "checkpoint_every": 3, "warmup": 2},
}
# frozen recipes: one TOML file per preset, every field written out, so the preset trains the same model
# whatever the defaults become (`default-2026-12-07-column`: assets/default's; `default-2026-12-07`: the
# default before it, its layers attending one column either side; `default-2026-12-03`: the default before
# that, which the shipped studies build on)
RECIPES = Path(__file__).parent / "recipes"
PRESETS.update({p.stem: tomllib.loads(p.read_text()) for p in sorted(RECIPES.glob("*.toml"))})
DOTTED_TABLES = ("fusion", "scene", "curriculum_scene")  # the fields a dotted key (`fusion.heads`) reaches into


def _scene_config(values: Mapping[str, Any], where: str) -> SceneConfig:
    known = {f.name for f in fields(SceneConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown {where} key(s) {unknown}; valid keys: {sorted(known)}")
    return SceneConfig(**values)


def scene_config(tc: TrainConfig) -> SceneConfig:
    return _scene_config({**dict(tc.scene), **CAPTIONS[tc.captions]}, "scene config")


def curriculum_scene_config(tc: TrainConfig) -> SceneConfig:
    """The scenes of the first `curriculum_steps` steps: `scene` with `curriculum_scene` over it."""
    return _scene_config({**dict(tc.scene), **dict(tc.curriculum_scene), **CAPTIONS[tc.captions]},
                         "curriculum_scene")


def apply_overrides(d: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`TrainConfig` keyword arguments: `d` (preset and file values) with `key=value` overrides on top.

    A dotted key (`fusion.heads`) changes one entry of the fusion, scene or curriculum_scene
    table; a fusion or curriculum_scene table names changes to its default, not all of it.
    Unknown keys, dotted or not, are refused by name.
    """
    d = dict(d)
    base = TrainConfig()
    for key, value in (overrides or {}).items():
        top, _, sub = key.partition(".")
        if sub:
            if top not in DOTTED_TABLES:
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
    return d


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
    return TrainConfig(**apply_overrides(d, overrides))


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value`, value parsed as TOML when it can be (numbers, booleans), else a string."""
    if "=" not in text:
        raise InputError(f"override {text!r} must look like key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value
