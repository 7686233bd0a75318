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
