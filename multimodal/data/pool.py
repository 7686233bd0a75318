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

if TYPE_CHECKING:
    from multimodal.model import MultimodalModel

SPLIT_OFFSETS = {"train": 0, "val": 10_000_000, "test": 20_000_000, "curriculum": 30_000_000}


def split_seeds(split: str, n: int, seed: int) -> list[int]:
    base = SPLIT_OFFSETS[split] + seed * 1_000_003
    return [base + i for i in range(n)]


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
