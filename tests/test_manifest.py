"""JSONL manifests: scenes round-trip through files; each bad row is one error naming its line,
and the good rows still load."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from multimodal.data.manifest import (MANIFEST_KEYS, SAMPLE_RATE, ManifestRow, load_manifest,
                                      scene_to_manifest_row, write_manifest)
from multimodal.data.scenes import SceneConfig, generate_scene
from multimodal.types import InputError

CFG = SceneConfig(image_size=64, duration=1.5)


@pytest.fixture
def files(tmp_path):
    """A 64x48 image and a 2 s 16 kHz clip next to where the manifest will go."""
    Image.fromarray(np.full((48, 64, 3), 128, dtype=np.uint8)).save(tmp_path / "ok.png")
    sf.write(tmp_path / "ok.wav", np.zeros(2 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE, subtype="PCM_16")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return tmp_path


def good(caption="a grey square", **extra) -> dict:
    return {"caption": caption, "image": "ok.png", "audio": "ok.wav", **extra}


# -- round trip ----------------------------------------------------------------------------


def test_scenes_round_trip_through_a_manifest(tmp_path):
    scenes = [generate_scene(seed, CFG) for seed in range(4)]
    rows = [scene_to_manifest_row(s, tmp_path / "data", f"scene{i}") for i, s in enumerate(scenes)]
    assert all(set(r) == set(MANIFEST_KEYS) for r in rows)
    assert rows[0]["image"] == "scene0.png" and rows[0]["audio"] == "scene0.wav"  # relative to the folder
    path = write_manifest(rows, tmp_path / "data" / "train.jsonl")
    assert len(path.read_text().splitlines()) == 4

    loaded, errors = load_manifest(path, progress=False)
    assert errors == [] and len(loaded) == 4
    for i, (row, s) in enumerate(zip(loaded, scenes)):
        assert isinstance(row, ManifestRow) and row.row == i + 1
        assert row.caption == s.caption
        assert row.image.dtype == np.uint8
        np.testing.assert_array_equal(row.image, s.image)
        assert row.sample_rate == SAMPLE_RATE and row.audio.dtype == np.float32
        assert row.audio.shape == s.audio.shape and row.duration == pytest.approx(CFG.duration)
        np.testing.assert_allclose(row.audio, s.audio, atol=2.0 ** -14)  # 16-bit quantisation
        np.testing.assert_array_equal(row.boxes, [o["box"] for o in s.objects])
        np.testing.assert_allclose(row.intervals, [[e["start"], e["end"]] for e in s.events])
        assert row.phrases == s.phrases
        assert row.image_path == tmp_path / "data" / f"scene{i}.png"


def test_relative_to_places_paths_for_a_manifest_elsewhere(tmp_path):
    s = generate_scene(0, CFG)
    row = scene_to_manifest_row(s, tmp_path / "files" / "scenes", "a", relative_to=tmp_path)
    assert row["image"] == "files/scenes/a.png"
    (loaded,), errors = load_manifest(write_manifest([row], tmp_path / "m.jsonl"), progress=False)
    np.testing.assert_array_equal(loaded.image, s.image)


def test_optional_fields_comments_and_single_modality(files):
    lines = ["# a comment", "", json.dumps({"caption": "  only an image  ", "image": "ok.png"}),
             "   ", json.dumps({"caption": "only audio", "audio": str(files / "ok.wav"),  # absolute path
                                "intervals": [[0.5, 1.0]],
                                "phrases": [{"span": [0, 4], "target": "event", "index": 0}]}),
             json.dumps({"caption": " a box", "image": "ok.png", "boxes": [[0, 0, 64, 48]],
                         "phrases": [{"span": [1, 6], "target": "object", "index": 0, "text": "a box"}]})]
    (files / "m.jsonl").write_text("\n".join(lines) + "\n")
    rows, errors = load_manifest(files / "m.jsonl", progress=False)
    assert errors == []
    assert [r.row for r in rows] == [3, 5, 6]
    image_only, audio_only, boxed = rows
    assert image_only.caption == "only an image" and image_only.image.shape == (48, 64, 3)
    assert image_only.audio is None and image_only.sample_rate is None and image_only.duration is None
    assert audio_only.image is None and audio_only.audio.shape == (2 * SAMPLE_RATE,)
    assert audio_only.intervals == [[0.5, 1.0]]
    assert audio_only.phrases == [{"span": [0, 4], "target": "event", "index": 0, "text": "only"}]
    # spans count from the caption as written; leading spaces are stripped and the span follows
    assert boxed.caption == "a box" and boxed.phrases[0]["span"] == [0, 5]


def test_audio_is_resampled_to_16k_mono(tmp_path):
    sr = 8000
    t = np.arange(sr) / sr  # 1 s
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    sf.write(tmp_path / "tone.wav", np.stack([tone, tone], axis=1), sr, subtype="PCM_16")  # stereo
    write_manifest([{"caption": "a tone", "audio": "tone.wav", "intervals": [[0.0, 1.0]]}], tmp_path / "m.jsonl")
    (row,), _ = load_manifest(tmp_path / "m.jsonl", progress=False)
    assert row.sample_rate == SAMPLE_RATE and row.audio.ndim == 1 and abs(len(row.audio) - SAMPLE_RATE) <= 1
    spectrum = np.abs(np.fft.rfft(row.audio))
    assert np.argmax(spectrum) * SAMPLE_RATE / len(row.audio) == pytest.approx(440, abs=2)


# -- bad rows ------------------------------------------------------------------------------

BAD_ROWS = {  # line -> a phrase its error must contain
    '{"caption": "oops", "image": "ok.png"': "invalid JSON",
    json.dumps(good(image="missing.png")): "image 'missing.png' not found",
    json.dumps(good(image="corrupt.png")): "image 'corrupt.png'",
    json.dumps(good(colour="red")): "unknown key(s) ['colour']; valid keys: ['caption', 'image'",
    json.dumps(good(intervals=[[1.0, 0.5]])): "interval 0 [1.0, 0.5] must have start < end",
    json.dumps(good(intervals=[[1.5, 2.5]])): "outside the 2.000 s clip",
    json.dumps(good(boxes=[[10, 10, 70, 20]])): "box 0 [10.0, 10.0, 70.0, 20.0] is not inside the 64x48 image",
    json.dumps(good(phrases=[{"span": [0, 99], "target": "object", "index": 0}], boxes=[[0, 0, 8, 8]])):
        "phrase 0 span [0, 99] is outside the caption",
    json.dumps(good(phrases=[{"span": [0, 6], "target": "object", "index": 1}], boxes=[[0, 0, 8, 8]])):
        "phrase 0 index 1 is out of range: the row has 1 boxes",
    json.dumps({"image": "ok.png"}): "'caption' is missing",
    json.dumps({"caption": "no media"}): "give an 'image' or an 'audio' path",
    json.dumps(good(caption="   ")): "caption: text is empty",
    json.dumps(["a list"]): "must be a JSON object",
}


def test_each_bad_row_is_one_error_and_good_rows_are_kept(files):
    lines, expected = [json.dumps(good("first"))], {}
    for line, message in BAD_ROWS.items():
        lines.append(line)
        expected[len(lines)] = message
        lines.append(json.dumps(good(f"good after row {len(lines)}")))
    (files / "data.jsonl").write_text("\n".join(lines) + "\n")

    rows, errors = load_manifest(files / "data.jsonl", progress=False)
    assert len(errors) == len(BAD_ROWS)
    for error, (number, message) in zip(errors, sorted(expected.items())):
        assert error.startswith(f"manifest data.jsonl row {number}: "), error
        assert message in error, (message, error)
    assert [r.caption for r in rows] == ["first"] + [f"good after row {n}" for n in sorted(expected)]
    assert [r.row for r in rows] == [1] + [n + 1 for n in sorted(expected)]
    assert all(r.image.shape == (48, 64, 3) and r.audio.shape == (2 * SAMPLE_RATE,) for r in rows)


def test_strict_raises_on_the_first_bad_row(files):
    write_manifest([good(), good(), good(image="missing.png"), good(colour="red")], files / "data.jsonl")
    with pytest.raises(InputError, match=r"data.jsonl row 3: image 'missing.png' not found"):
        load_manifest(files / "data.jsonl", strict=True, progress=False)
    rows, errors = load_manifest(files / "data.jsonl", progress=False)
    assert len(rows) == 2 and len(errors) == 2


def test_all_bad_manifest_raises_listing_errors(files):
    write_manifest([good(image="missing.png"), {"caption": "x"}, good(colour="red")], files / "bad.jsonl")
    with pytest.raises(InputError) as info:
        load_manifest(files / "bad.jsonl", progress=False)
    message = str(info.value)
    assert "no usable rows (3 bad)" in message
    assert all(f"row {n}" in message for n in (1, 2, 3))


def test_empty_and_missing_manifests_raise(tmp_path):
    (tmp_path / "empty.jsonl").write_text("# nothing here\n\n")
    with pytest.raises(InputError, match="has no rows"):
        load_manifest(tmp_path / "empty.jsonl", progress=False)
    with pytest.raises(InputError, match="does not exist"):
        load_manifest(tmp_path / "nope.jsonl", progress=False)
    with pytest.raises(InputError, match="is a directory"):
        load_manifest(tmp_path, progress=False)
