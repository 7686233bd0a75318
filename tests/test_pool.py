"""Seed splits: the scenes a model trains, validates and is tested on never overlap, for any seeds."""

import random

import pytest

from multimodal.data.pool import MAX_SPLIT_SCENES, SPLIT_OFFSETS, split_seeds
from multimodal.types import InputError


def _range(split: str, seed: int) -> tuple[int, int]:
    """[first, end) of a full-size split: the seeds are contiguous (tested below), so two ends describe it."""
    first = split_seeds(split, 1, seed)[0]
    return first, first + MAX_SPLIT_SCENES


@pytest.mark.parametrize("split, seed", [("train", 0), ("test", 9), ("val", 10), ("curriculum", 123_456)])
def test_a_split_is_contiguous_from_its_first_seed(split, seed):
    seeds = split_seeds(split, MAX_SPLIT_SCENES, seed)
    assert seeds == list(range(seeds[0], seeds[0] + MAX_SPLIT_SCENES))


def test_seeds_0_to_9_keep_their_original_scenes():
    """The shipped model (seed 0), the studies (0-2) and the card's fresh test set (eval --seed 1)."""
    assert split_seeds("train", 3, 0) == [0, 1, 2]
    assert split_seeds("test", 2, 1) == [20_000_000 + 1_000_003, 20_000_000 + 1_000_004]
    assert split_seeds("val", 1, 9) == [10_000_000 + 9 * 1_000_003]


def test_the_reported_leaks_are_gone():
    """Seed 20 used to draw 440 of seed 0's 500 test scenes for training; seed 10, 98 validation scenes."""
    assert not set(split_seeds("train", 8000, 20)) & set(split_seeds("test", 500, 0))
    assert not set(split_seeds("train", 8000, 10)) & set(split_seeds("val", 256, 0))


def test_no_overlap_in_10000_random_pairs_at_full_size():
    rng = random.Random(0)
    splits = list(SPLIT_OFFSETS)
    seed_pool = list(range(0, 40)) + [rng.randrange(0, 10 ** 6) for _ in range(200)]
    checked = 0
    while checked < 10_000:
        a = (rng.choice(splits), rng.choice(seed_pool))
        b = (rng.choice(splits), rng.choice(seed_pool))
        if a == b:
            continue
        (a0, a1), (b0, b1) = _range(*a), _range(*b)
        assert a1 <= b0 or b1 <= a0, f"{a} [{a0}, {a1}) overlaps {b} [{b0}, {b1})"
        checked += 1


def test_every_pair_of_small_seeds_and_splits_is_disjoint():
    ranges = sorted(_range(split, seed) for split in SPLIT_OFFSETS for seed in range(25))
    assert all(r0[1] <= r1[0] for r0, r1 in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("args, words", [(("holdout", 5, 0), "unknown split"), (("test", 5, -1), "seed"),
                                         (("test", MAX_SPLIT_SCENES + 1, 0), "at most")])
def test_bad_requests_are_refused_by_name(args, words):
    with pytest.raises(InputError, match=words):
        split_seeds(*args)


# ---------------------------------------------------------------------------------------
# The pool: scenes generated when first drawn, audio features computed once per scene
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    from multimodal.train import build_model, load_config

    return build_model(load_config("smoke"))


def test_a_lazy_pool_generates_only_the_scenes_drawn_and_batches_as_an_eager_one(model):
    import torch

    from multimodal.data.pool import ScenePool
    from multimodal.data.scenes import SceneConfig, generate_scene
    from multimodal.io import AudioClip

    seeds = split_seeds("train", 8000, 0)
    lazy = ScenePool.build(seeds, SceneConfig())
    assert len(lazy.scenes) == 8000 and lazy.scenes.generated == 0
    idx = [3, 7999, 3]
    got = lazy.batch(model, idx)
    assert lazy.scenes.generated == 2 and sorted(lazy.audio_rows) == [3, 7999]
    scenes = [generate_scene(seeds[i]) for i in idx]
    assert lazy.scenes[-1].caption == scenes[1].caption and lazy.scenes[3].caption == scenes[0].caption
    want = {"image": model.encoders["image"].preprocess([s.image for s in scenes]),
            "audio": model.encoders["audio"].preprocess([AudioClip(s.audio, s.sample_rate, None) for s in scenes])}
    assert torch.equal(got["image"]["pixel_values"], want["image"]["pixel_values"])
    assert torch.equal(got["audio"]["features"], want["audio"]["features"])
    assert torch.equal(got["audio"]["frames"], want["audio"]["frames"])
    assert got["audio"]["durations"] == want["audio"]["durations"]
    eager = ScenePool.build(seeds[:8], SceneConfig(), workers=1)
    assert isinstance(eager.scenes, list) and eager.scenes[3].caption == scenes[0].caption
    with pytest.raises(IndexError):
        lazy.scenes[8000]
    with pytest.raises(InputError, match="workers = -1"):
        ScenePool.build(seeds, SceneConfig(), workers=-1)


def test_clips_of_different_lengths_are_padded_per_batch_as_preprocess_pads_them(model):
    """Manifest rows: each clip's features are kept at its own length and padded to the batch's longest."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from multimodal.data.pool import ScenePool
    from multimodal.io import AudioClip

    rate = 16000
    rng = np.random.default_rng(0)
    clips = [rng.normal(0, 0.1, int(rate * s)).astype(np.float32) for s in (1.0, 7.5, 2.0)]
    items = [SimpleNamespace(caption=f"c{i}", image=None, audio=a) for i, a in enumerate(clips)]
    pool = ScenePool.from_items(items, rate, hard_negatives=False)
    audio_only = SimpleNamespace(encoders={"audio": model.encoders["audio"]})
    for idx in ([0, 2], [1, 0], [2, 1, 0]):
        got = pool.batch(audio_only, idx)["audio"]
        want = model.encoders["audio"].preprocess([AudioClip(clips[i], rate, None) for i in idx])
        assert got["features"].shape == want["features"].shape
        assert torch.equal(got["features"], want["features"]) and torch.equal(got["frames"], want["frames"])
