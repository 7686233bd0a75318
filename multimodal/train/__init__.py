"""`multimodal train`: caption/scene matching with hard negatives on the procedural scenes.

The objective never looks at attention maps: each scene is scored against its caption, a
few one-attribute hard negatives and an easy negative (another scene's caption); heads must
find the referents on their own. Ground truth is for evaluation only. `config` says what a
run is told (`TrainConfig`, presets, overrides), `objective` what a step scores and
optimises (negatives, mining, losses), `loop` how it runs (model, parameter groups,
checkpoints with resume, the loop).
"""

from multimodal.train.config import (
    DOTTED_TABLES,
    PRESETS,
    TrainConfig,
    apply_overrides,
    curriculum_scene_config,
    load_config,
    parse_override,
    scene_config,
)
from multimodal.train.objective import (
    NegativeMining,
    best_threshold,
    calibrate_match_bias,
    candidate_captions,
    contrastive_loss,
    masked_word_loss,
    matching_accuracy,
    matching_loss,
    other_caption,
)
from multimodal.train.loop import (
    TRAIN_STATE,
    TrainingInterrupted,
    build_model,
    load_train_state,
    manifest_pools,
    parameter_groups,
    save_checkpoint,
    train,
)

__all__ = [
    "DOTTED_TABLES", "PRESETS", "TRAIN_STATE", "NegativeMining", "TrainConfig", "TrainingInterrupted", "apply_overrides",
    "best_threshold", "build_model", "calibrate_match_bias", "candidate_captions", "contrastive_loss",
    "curriculum_scene_config", "load_config", "load_train_state", "manifest_pools", "masked_word_loss",
    "matching_accuracy", "matching_loss",
    "other_caption", "parameter_groups", "parse_override", "save_checkpoint", "scene_config", "train",
]
