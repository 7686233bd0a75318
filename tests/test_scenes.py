"""Procedural scenes: deterministic by seed, ground truth consistent with the pixels, the
waveform and the caption; hard negatives false and exactly one attribute away."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from multimodal.data.scenes import (CHANGE_TYPES, COLOURS, EVENT_KINDS, SHAPES, SIZES, Scene, SceneConfig,
                                    REPEAT, caption_is_true, change_key, change_kinds, event_phrase, every_negative,
                                    generate_scene, hard_negative, load_scene_truth, parse_caption, save_scene)

SEEDS = range(200)
FRAME = 80  # samples: 5 ms frames at 16 kHz for the audio energy checks


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [generate_scene(seed) for seed in SEEDS]


# -- determinism and shapes ---------------------------------------------------------------


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b, c = generate_scene(7), generate_scene(7), generate_scene(8)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.audio, b.audio)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.caption == b.caption and a.phrases == b.phrases
    assert a.objects == b.objects and a.events == b.events
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.audio, c.audio)
    assert a.objects != c.objects


def test_captions_vary_across_seeds(scenes):
    assert len({s.caption for s in scenes}) > len(scenes) // 2


def test_image_audio_and_mask_shapes(scenes):
    cfg = SceneConfig()
    for s in scenes[:20]:
        assert s.image.shape == (cfg.image_size, cfg.image_size, 3) and s.image.dtype == np.uint8
        assert s.masks.dtype == np.bool_ and s.masks.shape == (len(s.objects), cfg.image_size, cfg.image_size)
        assert cfg.min_objects <= len(s.objects) <= cfg.max_objects
        assert cfg.min_events <= len(s.events) <= cfg.max_events
        assert s.audio.dtype == np.float32 and s.audio.shape == (int(cfg.duration * cfg.sample_rate),)
        assert np.abs(s.audio).max() <= 1.0
        assert s.sample_rate == cfg.sample_rate


def test_config_changes_image_size_and_duration():
    s = generate_scene(3, SceneConfig(image_size=64, duration=2.0, max_objects=2, max_events=1))
    assert s.image.shape == (64, 64, 3) and s.masks.shape[1:] == (64, 64)
    assert len(s.objects) == 2 and len(s.events) == 1
    assert s.audio.shape == (32000,)
    assert all(0 <= e["start"] < e["end"] <= 2.0 for e in s.events)


# -- image ground truth -------------------------------------------------------------------


def test_masks_nonempty_disjoint_inside_boxes_and_coloured(scenes):
    for s in scenes:
        assert s.masks.sum(axis=(1, 2)).min() > 0, s.seed
        assert s.masks.sum(axis=0).max() == 1, f"seed {s.seed}: masks overlap"
        for obj, mask in zip(s.objects, s.masks):
            assert obj["shape"] in SHAPES and obj["colour"] in COLOURS and obj["size"] in SIZES
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= s.image.shape[1] and 0 <= y0 < y1 <= s.image.shape[0]
            outside = mask.copy()
            outside[y0:y1, x0:x1] = False
            assert not outside.any(), f"seed {s.seed}: mask leaves its box"
            # the pixels under the mask are the object's colour, not the background
            mean = s.image[mask].astype(float).mean(axis=0)
            assert np.abs(mean - COLOURS[obj["colour"]]).max() < 25, (s.seed, obj, mean)


def test_distinct_colour_shape_pairs(scenes):
    for s in scenes:
        pairs = [(o["colour"], o["shape"]) for o in s.objects]
        assert len(set(pairs)) == len(pairs)


# -- audio ground truth -------------------------------------------------------------------


def _frame_rms(audio: np.ndarray) -> np.ndarray:
    n = len(audio) // FRAME * FRAME
    return np.sqrt((audio[:n].reshape(-1, FRAME).astype(np.float64) ** 2).mean(axis=1))  # (frames,)


def test_events_inside_clip_ordered_and_louder_than_background(scenes):
    cfg = SceneConfig()
    for s in scenes:
        sr = s.sample_rate
        background = np.ones(len(s.audio), dtype=bool)
        prev_end = 0.0
        for e in s.events:
            assert e["kind"] in EVENT_KINDS
            assert 0.0 <= e["start"] < e["end"] <= cfg.duration, (s.seed, e)
            assert e["start"] >= prev_end, f"seed {s.seed}: events overlap or are out of order"
            prev_end = e["end"]
            background[max(0, int(e["start"] * sr) - FRAME):int(e["end"] * sr) + FRAME] = False
        bg = s.audio[background].astype(np.float64)
        bg_rms = np.sqrt((bg ** 2).mean())
        bg_peak = _frame_rms(bg).max()
        for e in s.events:
            seg = s.audio[int(e["start"] * sr):int(e["end"] * sr)].astype(np.float64)
            ratio = np.sqrt((seg ** 2).mean()) / bg_rms
            # clicks are sparse impulses: loud peaks, modest mean energy
            assert ratio > (1.2 if e["kind"] == "clicks" else 4.0), (s.seed, e, ratio)
            assert _frame_rms(seg).max() > 2.5 * bg_peak, (s.seed, e)


# -- captions -----------------------------------------------------------------------------


def test_phrase_spans_slice_caption_and_point_at_their_referent(scenes):
    for s in scenes:
        assert s.phrases
        for p in s.phrases:
            start, end = p["span"]
            assert 0 <= start < end <= len(s.caption)
            assert s.caption[start:end] == p["text"]
            words = p["text"].split()
            if p["target"] == "object":
                obj = s.objects[p["index"]]
                assert obj["colour"] in words and obj["shape"] in words, (s.seed, p, obj)
                if len(words) == 4:
                    assert words[1] == obj["size"]
            else:
                assert p["target"] == "event"
                assert p["text"] == event_phrase(s.events[p["index"]]), (s.seed, p)
        spans = [p["span"] for p in s.phrases]
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "phrases overlap or are out of order"
        event_starts = [s.events[p["index"]]["start"] for p in s.phrases if p["target"] == "event"]
        assert event_starts == sorted(event_starts)


def test_true_caption_is_true(scenes):
    for s in scenes:
        objs, evs = parse_caption(s.caption)
        assert len(objs) + len(evs) == len(s.phrases)
        assert caption_is_true(s, objs, evs), (s.seed, s.caption)


def test_caption_is_true_rejects_a_missing_object_and_swapped_events():
    s = generate_scene(0)
    objs, evs = parse_caption(s.caption)
    absent = next((c, sh) for c in COLOURS for sh in SHAPES
                  if (c, sh) not in {(o["colour"], o["shape"]) for o in s.objects})
    assert not caption_is_true(s, [{"colour": absent[0], "shape": absent[1], "with_size": False}], evs)
    if len(s.events) == 2:
        both = [{"kind": e["kind"], "attribute": e["attribute"]} for e in s.events]
        assert caption_is_true(s, objs, both)
        assert not caption_is_true(s, objs, both[::-1])


def test_caption_is_true_needs_a_distinct_event_for_each_event_phrase(scenes):
    """"X then X" where one X is heard is false (before, both phrases found the same event and it
    passed); a scene never holds the same event twice, so every repeated phrase is false."""
    checked = 0
    for s in scenes:
        objs, evs = parse_caption(s.caption)
        for e in evs:
            assert not caption_is_true(s, objs, [e, e]), (s.seed, e)
            checked += 1
    assert checked > 50


# -- hard negatives -----------------------------------------------------------------------


def _differences(true: tuple[list[dict], list[dict]], neg: tuple[list[dict], list[dict]]) -> list[tuple]:
    """What changed between two parsed captions: [(field, phrase), ...], or [("order",)] for a swap."""
    (t_objs, t_evs), (n_objs, n_evs) = true, neg
    assert len(t_objs) == len(n_objs) and len(t_evs) == len(n_evs)
    if t_objs == n_objs and len(t_evs) == 2 and t_evs != n_evs and t_evs == n_evs[::-1]:
        return [("order",)]
    diffs = []
    for i, (a, b) in enumerate(zip(t_objs, n_objs)):
        assert a["with_size"] == b["with_size"]
        diffs += [(key, i) for key in ("colour", "shape", "size") if a.get(key) != b.get(key)]
    for i, (a, b) in enumerate(zip(t_evs, n_evs)):
        if a["kind"] != b["kind"]:
            diffs.append(("event_kind", i))  # a new kind brings its own attribute
        elif a["attribute"] != b["attribute"]:
            diffs.append(("pitch" if a["kind"] == "tone" else "direction", i))
    return diffs


def test_hard_negatives_are_false_and_one_attribute_away(scenes):
    seen = set()
    for s in scenes:
        rng = np.random.default_rng(1000 + s.seed)
        true = parse_caption(s.caption)
        for _ in range(2):
            caption, phrases, change = hard_negative(s, rng)
            neg = parse_caption(caption)
            assert caption != s.caption
            assert not caption_is_true(s, *neg), (s.seed, s.caption, caption)
            diffs = _differences(true, neg)
            assert len(diffs) == 1, (s.seed, s.caption, caption, diffs)
            assert diffs[0][0] == change["type"], (diffs, change)
            for p in phrases:  # the negative's phrases are linked the same way
                start, end = p["span"]
                assert caption[start:end] == p["text"]
                assert p["index"] < len(s.objects if p["target"] == "object" else s.events)
            seen.add(change["type"])
    assert seen == set(CHANGE_TYPES), f"never produced: {set(CHANGE_TYPES) - seen}"


def test_requested_change_type_is_honoured_or_refused(scenes):
    for s in scenes[:40]:
        rng = np.random.default_rng(s.seed)
        true = parse_caption(s.caption)
        for kind in CHANGE_TYPES:
            try:
                caption, _, change = hard_negative(s, rng, change_type=kind)
            except ValueError:
                continue
            assert change["type"] == kind
            assert [d[0] for d in _differences(true, parse_caption(caption))] == [kind]


def test_repeat_negatives_name_the_other_event_twice_only_when_asked(scenes):
    """REPEAT: one event phrase of a two-event caption made into the other's; false by the ground truth;
    never drawn unless asked for; asking adds it to the options and leaves the other kinds' as they were."""
    repeats = 0
    for s in scenes:
        assert REPEAT not in change_kinds(s)
        two = sum(p["target"] == "event" for p in s.phrases) == 2
        assert (REPEAT in change_kinds(s, repeat=True)) == two
        assert [k for k in change_kinds(s, repeat=True) if k != REPEAT] == change_kinds(s)
        if not two:
            with pytest.raises(ValueError):
                hard_negative(s, np.random.default_rng(0), change_type=REPEAT)
            continue
        caption, phrases, change = hard_negative(s, np.random.default_rng(s.seed), change_type=REPEAT)
        objs, evs = parse_caption(caption)
        assert change["type"] == REPEAT and evs[0] == evs[1] and not caption_is_true(s, objs, evs)
        assert objs == parse_caption(s.caption)[0]
        assert phrases[change["phrase"]]["text"] == event_phrase({"kind": change["after"][0],
                                                                   "attribute": change["after"][1]})
        repeats += 1
        drawn = {hard_negative(s, np.random.default_rng(k), repeat=True)[2]["type"] for k in range(40)}
        assert REPEAT in drawn and drawn - {REPEAT} <= set(CHANGE_TYPES)
    assert repeats > 10


def test_type_weights_steer_the_kind_of_change(scenes):
    """A kind weighted 0 is never drawn; a heavily weighted kind dominates."""
    counts = {k: 0 for k in CHANGE_TYPES}
    for s in scenes[:60]:
        rng = np.random.default_rng(s.seed)
        for _ in range(5):
            _, _, change = hard_negative(s, rng, type_weights={"shape": 50.0, "colour": 0.0, "pitch": 0.0})
            counts[change["type"]] += 1
    assert counts["colour"] == counts["pitch"] == 0
    assert counts["shape"] > 0.8 * sum(counts.values())  # every scene can change a shape


def test_value_weights_steer_the_change_within_its_kind_and_every_change_names_its_key(scenes):
    """value_weights: a change weighted 0 is never made, one weighted heavily dominates its kind; a change
    the mapping does not name weighs as its kind (else 1). The change's key names what it replaced and with what,
    and without value_weights the draws are exactly those of before (the key draws nothing)."""
    made, total = {"shape:star>cross": 0, "shape:star>circle": 0}, 0
    weights = {"shape:star>cross": 100.0, "shape:star>circle": 0.0}
    for s in scenes[:200]:
        for o in s.objects:
            if o["shape"] != "star" or f"{o['colour']} star" not in s.caption:
                continue
            for j in range(4):
                rng = np.random.default_rng([s.seed, j])
                caption, _, change = hard_negative(s, rng, change_type="shape", value_weights=weights)
                if change["before"] == "star":
                    total += 1
                    made[change["key"]] = made.get(change["key"], 0) + 1
                    assert change["key"] == change_key("shape", "star", change["after"])
    assert total >= 20 and made["shape:star>circle"] == 0 and made["shape:star>cross"] > 0.6 * total, made
    for s in scenes[:30]:  # without value_weights: the draws of before; every change names its key
        a, b = np.random.default_rng(s.seed), np.random.default_rng(s.seed)
        for _ in range(4):
            caption, _, change = hard_negative(s, a)
            assert caption == hard_negative(s, b, value_weights=None)[0]
            assert change["key"].startswith(change["type"])
    assert change_key("event_kind", ["clicks", None], ["chirp", "rising"]) == "event_kind:clicks>chirp rising"
    assert change_key("order", [0, 1], [1, 0]) == "order"


def test_every_negative_makes_each_change_of_a_kind_once_and_hard_negative_draws_among_them(scenes):
    """every_negative: all the changes of a kind the scene allows, each false and one attribute away, each
    once; a drawn negative of that kind is one of them (benchmarks/confusions.py scores them all)."""
    made = 0
    for s in scenes[:40]:
        true = parse_caption(s.caption)
        for kind in change_kinds(s, repeat=True):
            every = every_negative(s, kind)
            keys = [(c["key"], c.get("phrase")) for _, _, c in every]
            assert every and len(set(keys)) == len(keys)
            for caption, _, change in every:
                assert not caption_is_true(s, *parse_caption(caption)) and change["type"] == kind
                if kind not in (REPEAT, "order"):
                    assert [d[0] for d in _differences(true, parse_caption(caption))] == [kind]
            drawn = hard_negative(s, np.random.default_rng(s.seed), change_type=kind)[0]
            assert drawn in [c for c, _, _ in every]
            made += len(every)
    assert made > 40 * 10
    assert every_negative(generate_scene(0, SceneConfig(max_events=1, min_events=1)), "order") == []


def test_binding_negatives_name_a_value_another_object_has(scenes):
    """binding=1: a colour/shape change takes a value present in the scene whenever one is allowed;
    the negative stays false and one attribute away."""
    present = {0.0: 0, 1.0: 0}
    total = 0
    for s in scenes[:60]:
        true = parse_caption(s.caption)
        for kind in ("colour", "shape"):
            for binding in (0.0, 1.0):
                caption, _, change = hard_negative(s, np.random.default_rng(s.seed), change_type=kind,
                                                   binding=binding)
                assert not caption_is_true(s, *parse_caption(caption))
                assert [d[0] for d in _differences(true, parse_caption(caption))] == [kind]
                present[binding] += any(o[kind] == change["after"] for o in s.objects)
            total += 1
    assert present[1.0] > 0.6 * total and present[1.0] > 2 * present[0.0], (present, total)


def test_impossible_change_type_raises():
    s = generate_scene(0)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no 'loudness' change"):
        hard_negative(s, rng, change_type="loudness")
    single = next(generate_scene(i) for i in range(100) if sum(p["target"] == "event" for p in
                                                              generate_scene(i).phrases) == 1)
    with pytest.raises(ValueError, match="order"):
        hard_negative(single, rng, change_type="order")
    unsized = next(sc for sc in (generate_scene(i) for i in range(100))
                   if all(len(p["text"].split()) == 3 for p in sc.phrases if p["target"] == "object"))
    with pytest.raises(ValueError, match="size"):
        hard_negative(unsized, rng, change_type="size")


def test_hard_negative_is_deterministic_given_rng():
    s = generate_scene(5)
    a = hard_negative(s, np.random.default_rng(3))
    b = hard_negative(s, np.random.default_rng(3))
    assert a == b


# -- files --------------------------------------------------------------------------------


def test_save_and_load_ground_truth_round_trip(tmp_path):
    s = generate_scene(11)
    paths = save_scene(s, tmp_path / "out", "s11")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"s11.png", "s11.wav", "s11.json", "s11_masks.png"}

    np.testing.assert_array_equal(np.asarray(Image.open(paths["image"]).convert("RGB")), s.image)
    info = sf.info(paths["audio"])
    assert info.subtype == "PCM_16" and info.samplerate == s.sample_rate and info.channels == 1
    audio, sr = sf.read(paths["audio"], dtype="float32")
    assert sr == s.sample_rate and audio.shape == s.audio.shape
    np.testing.assert_allclose(audio, s.audio, atol=2.0 ** -14)

    gt = load_scene_truth(paths["json"])
    assert gt["caption"] == s.caption and gt["seed"] == 11 and gt["sample_rate"] == s.sample_rate
    assert gt["phrases"] == json.loads(json.dumps(s.phrases))
    assert gt["objects"] == json.loads(json.dumps(s.objects))
    assert gt["events"] == json.loads(json.dumps(s.events))
    assert gt["masks"].dtype == np.bool_
    np.testing.assert_array_equal(gt["masks"], s.masks)
    assert gt["image"] == "s11.png" and gt["audio"] == "s11.wav"


def test_captions_about_one_modality_only_and_bad_counts_refused():
    """max_mentioned_events = 0: captions name objects only (and their negatives change objects only);
    max_mentioned_objects = 0: events only. The scenes themselves still have both. Configs that would
    leave a caption empty or a scene without objects/events are refused by name."""
    from multimodal.errors import InputError

    rng = np.random.default_rng(0)
    for cfg, target, kinds in ((SceneConfig(max_mentioned_events=0), "object", {"colour", "shape", "size"}),
                               (SceneConfig(max_mentioned_objects=0), "event",
                                {"pitch", "direction", "event_kind", "order"})):
        for seed in range(20):
            s = generate_scene(seed, cfg)
            assert s.phrases and {p["target"] for p in s.phrases} == {target}
            assert len(s.objects) >= 2 and len(s.events) >= 1
            assert set(change_kinds(s)) <= kinds
            neg, _, change = hard_negative(s, rng)
            assert neg != s.caption and change["type"] in kinds
    assert generate_scene(3).caption == generate_scene(3, SceneConfig()).caption  # both: draws unchanged
    for bad, named in ((dict(max_mentioned_objects=0, max_mentioned_events=0), "captions empty"),
                       (dict(max_mentioned_events=-1), "must be >= 0"), (dict(min_objects=0), "1 <= min <= max"),
                       (dict(min_events=3, max_events=2), "1 <= min <= max")):
        with pytest.raises(InputError, match=named):
            SceneConfig(**bad)
