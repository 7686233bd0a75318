"""The scene pool training and evaluation draw from, and the seed splits that keep them apart.

Procedural scenes are generated once per pool (in worker processes when asked) and their audio
features are computed once; image features are computed per batch. Seeds come from disjoint
ranges per split (`split_seeds`), so a model never trains on the scenes it is tested on.
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing import get_context
from typing import TYPE_CHECKING

from tqdm import tqdm

from multimodal.data.scenes import SceneConfig, generate_scene
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
    s = generate_scene(seed, cfg)
    return s


@dataclass
class ScenePool:
    scenes: list  # Scene objects or manifest rows (.caption, .image, .audio kept for preprocessing)
    audio_batch: dict  # audio encoder batch for every scene, built once
    hard_negatives: bool = True  # one-attribute negatives exist (procedural scenes only)

    @classmethod
    def build(cls, model: MultimodalModel, seeds: list[int], cfg: SceneConfig, workers: int,
              desc: str) -> "ScenePool":
        ctx = get_context("fork") if workers > 1 else None
        jobs = [(s, cfg) for s in seeds]
        if ctx is not None:
            with ctx.Pool(workers) as pool:
                scenes = list(tqdm(pool.imap(_make_scene, jobs, chunksize=64), total=len(jobs), desc=desc))
        else:
            scenes = [_make_scene(j) for j in tqdm(jobs, desc=desc)]
        return cls.from_items(model, scenes, cfg.sample_rate)

    @classmethod
    def from_items(cls, model: MultimodalModel, items: list, sample_rate: int, hard_negatives: bool = True
                   ) -> "ScenePool":
        audio = None
        if "audio" in model.encoders:
            audio = model.encoders["audio"].preprocess([AudioClip(s.audio, sample_rate, None) for s in items])
        return cls(items, audio, hard_negatives)

    def batch(self, model: MultimodalModel, idx: list[int]) -> dict[str, dict]:
        out = {}
        if "image" in model.encoders:
            out["image"] = model.encoders["image"].preprocess([self.scenes[i].image for i in idx])
        if self.audio_batch is not None:
            a = self.audio_batch
            out["audio"] = {"features": a["features"][idx], "frames": a["frames"][idx],
                            "durations": [a["durations"][i] for i in idx]}
        return out
