"""The scene pool training and evaluation draw from, and the seed splits that keep them apart.

Procedural scenes are generated when first drawn (or all up front, in worker processes, when
asked) and kept; each scene's audio features are computed once, when a batch first needs them;
image features are computed per batch. Start-up therefore scales with the steps a run takes, not
with the size of its pool. Seeds come from disjoint
ranges per split (`split_seeds`), so a model never trains on the scenes it is tested on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from multimodal.data.scenes import Scene, SceneConfig, generate_scene
from multimodal.io import AudioClip
from multimodal.types import InputError

if TYPE_CHECKING:
    from multimodal.model import MultimodalModel

SPLIT_OFFSETS = {"train": 0, "val": 10_000_000, "test": 20_000_000, "curriculum": 30_000_000}
MAX_SPLIT_SCENES = 990_000  # scenes one split of one seed can draw (keeps every range below disjoint)
LEGACY_SEEDS = 10  # seeds 0-9 keep their original scenes (the shipped model, the studies, the card)
LEGACY_STRIDE = 1_000_003  # seeds 0-9: split offset + seed * stride
WIDE_BASE = 10 ** 12  # seeds >= 10: a block of WIDE_BLOCK per (seed, split), far above every other range
WIDE_BLOCK = 1_000_000


def split_seeds(split: str, n: int, seed: int) -> list[int]:
    """The scene seeds of one split (train / val / test / curriculum) for a training or eval seed.

    Disjoint by construction for any two (split, seed) pairs, as long as n <= MAX_SPLIT_SCENES:
    - seeds 0-9: split k starts at 10M * k and seed s at + s * 1_000_003, so a seed's range
      (< 990,000 long) ends before the next seed's, and seed 9's ends below 10M * (k + 1);
    - seeds >= 10 (which used to run into the next split: a seed-20 model had seen 440 of the
      500 test scenes of seed 0): block (seed - 10) * 4 + k of 1,000,000 above 10**12.
    Probe scenes (`multimodal.analysis.probe`) start at 50M, between the two regions.
    """
    if split not in SPLIT_OFFSETS:
        raise InputError(f"unknown split {split!r}; use one of {', '.join(SPLIT_OFFSETS)}")
    if int(seed) != seed or seed < 0:
        raise InputError(f"seed must be a whole number >= 0, got {seed!r}")
    if not 0 <= n <= MAX_SPLIT_SCENES:
        raise InputError(f"a split holds at most {MAX_SPLIT_SCENES:,} scenes per seed, asked for {n:,}")
    if seed < LEGACY_SEEDS:
        base = SPLIT_OFFSETS[split] + seed * LEGACY_STRIDE
    else:
        base = WIDE_BASE + ((seed - LEGACY_SEEDS) * len(SPLIT_OFFSETS) + list(SPLIT_OFFSETS).index(split)) * WIDE_BLOCK
    return list(range(base, base + n))


def _make_scene(args):
    seed, cfg = args
    return generate_scene(seed, cfg)


class LazyScenes(Sequence):
    """The scenes of a list of seeds, each generated the first time it is asked for, then kept:
    a run that draws 2,000 scenes of an 8,000-scene pool generates 2,000."""

    def __init__(self, seeds: Sequence[int], cfg: SceneConfig):
        self.seeds, self.cfg = list(seeds), cfg
        self._made: dict[int, Scene] = {}

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # an index error past the end, negative indices from the end
        scene = self._made.get(i)
        if scene is None:
            scene = self._made[i] = generate_scene(self.seeds[i], self.cfg)
        return scene

    @property
    def generated(self) -> int:
        return len(self._made)


@dataclass
class ScenePool:
    """Scenes (or manifest rows: anything with .caption, .image, .audio) and their audio features,
    computed the first time a batch needs them and kept (per scene, so a batch pays only for its new
    scenes)."""

    scenes: Sequence  # Scene objects (a LazyScenes) or manifest rows
    sample_rate: int
    hard_negatives: bool = True  # one-attribute negatives exist (procedural scenes only)
    audio_rows: dict[int, tuple] = field(default_factory=dict, repr=False)  # scene -> (windows, frames, duration)

    @classmethod
    def build(cls, seeds: list[int], cfg: SceneConfig, workers: int = 0, desc: str = "generating scenes",
              progress: bool = True) -> "ScenePool":
        """The scenes of `seeds`: generated when first drawn (`workers` = 0), or all of them now,
        in `workers` processes (with a progress bar titled `desc` unless `progress` is False)."""
        if workers < 0:
            raise InputError(f"workers = {workers} must be >= 0 (0: generate each scene when first drawn)")
        if workers == 0:
            return cls(LazyScenes(seeds, cfg), cfg.sample_rate)
        jobs = [(s, cfg) for s in seeds]
        if workers > 1:
            with get_context("fork").Pool(workers) as pool:
                scenes = list(tqdm(pool.imap(_make_scene, jobs, chunksize=64), total=len(jobs), desc=desc,
                                   disable=not progress))
        else:
            scenes = [_make_scene(j) for j in tqdm(jobs, desc=desc, disable=not progress)]
        return cls(scenes, cfg.sample_rate)

    @classmethod
    def from_items(cls, items: list, sample_rate: int, hard_negatives: bool = True) -> "ScenePool":
        return cls(list(items), sample_rate, hard_negatives)

    def _audio(self, model: MultimodalModel, idx: list[int]) -> dict:
        """The audio encoder batch of scenes idx, from each scene's features (computed once)."""
        encoder = model.encoders["audio"]
        new = [i for i in dict.fromkeys(idx) if i not in self.audio_rows]
        if new:
            b = encoder.preprocess([AudioClip(self.scenes[i].audio, self.sample_rate, None) for i in new])
            L = b["features"].shape[2]
            for j, i in enumerate(new):
                frames = int(b["frames"][j])
                windows = max(1, math.ceil(frames / L))
                self.audio_rows[i] = (b["features"][j, :windows].clone(), frames, b["durations"][j])
        rows = [self.audio_rows[i] for i in idx]
        W = max(r[0].shape[0] for r in rows)
        pad = float(encoder.normalise(torch.tensor(0.0)))  # a window of padding, as preprocess writes it
        features = rows[0][0].new_full((len(rows), W, *rows[0][0].shape[1:]), pad)  # (B, W, L, mels)
        for j, (f, _, _) in enumerate(rows):
            features[j, :f.shape[0]] = f
        return {"features": features, "frames": torch.tensor([r[1] for r in rows]),
                "durations": [r[2] for r in rows]}

    def batch(self, model: MultimodalModel, idx: list[int]) -> dict[str, dict]:
        """The image and audio encoder batches of scenes idx (for the model's encoders)."""
        out = {}
        if "image" in model.encoders:
            out["image"] = model.encoders["image"].preprocess([self.scenes[i].image for i in idx])
        if "audio" in model.encoders:
            out["audio"] = self._audio(model, idx)
        return out
