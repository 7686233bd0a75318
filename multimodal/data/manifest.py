"""JSONL manifests: train and evaluate on your own paired captions, images and audio.

One JSON object per line (blank lines and lines starting with # are skipped):

    {"caption": "a red circle with a rising chirp",      required
     "image": "img/0001.png",                            optional, relative to the manifest's folder
     "audio": "wav/0001.wav",                            optional (at least one of image/audio)
     "boxes": [[x0, y0, x1, y1], ...],                   optional, pixels of the original image
     "intervals": [[start_s, end_s], ...],               optional, seconds of the original clip
     "phrases": [{"span": [s, e], "target": "object", "index": 0}, ...]}
                                                         optional: caption characters -> box/interval

`load_manifest` validates every row at this boundary. A bad row becomes one error string
naming its line number and the problem; the other rows still load. Rows carry `.caption`,
`.image` and `.audio` like the procedural scenes, so the training and evaluation code can
take either.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from tqdm import tqdm

from multimodal.io import SAMPLE_RATE, AudioClip, check_text, load_audio, load_image, resample
from multimodal.types import InputError

MANIFEST_KEYS = ("caption", "image", "audio", "boxes", "intervals", "phrases")
PHRASE_KEYS = ("span", "target", "index", "text")  # "text", if given, must equal caption[s:e]
TARGETS = {"object": "boxes", "event": "intervals"}  # phrase target -> the list its index points into
MAX_ERRORS_SHOWN = 5  # errors listed when no row is usable


@dataclass
class ManifestRow:
    """One validated row. Boxes are in pixels of `image`, intervals in seconds of `audio`."""

    caption: str
    image: np.ndarray | None  # (H, W, 3) uint8
    audio: np.ndarray | None  # (n,) float32 mono at `sample_rate`
    sample_rate: int | None  # SAMPLE_RATE when there is audio
    boxes: list[list[float]] = field(default_factory=list)  # [x0, y0, x1, y1] per object
    intervals: list[list[float]] = field(default_factory=list)  # [start, end] seconds per event
    phrases: list[dict] = field(default_factory=list)  # {span [s, e], target, index, text}
    row: int = 0  # 1-based line number in the manifest
    image_path: Path | None = None
    audio_path: Path | None = None

    @property
    def duration(self) -> float | None:
        return None if self.audio is None else len(self.audio) / self.sample_rate


class _RowError(Exception):
    """A problem with one row; `load_manifest` prefixes it with the manifest and row number."""


# ---------------------------------------------------------------------------------------
# Field checks: each returns the clean value or raises _RowError
# ---------------------------------------------------------------------------------------


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _RowError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def _pairs(value: Any, key: str, width: int) -> list[list[float]]:
    if not isinstance(value, list):
        raise _RowError(f"{key!r} must be a list of {width}-number lists, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, list) or len(item) != width:
            raise _RowError(f"{key}[{i}] must be a list of {width} numbers, got {item!r}")
        out.append([_number(v, f"{key}[{i}]") for v in item])
    return out


def _resolve(value: Any, key: str, base: Path) -> tuple[Path, str]:
    if not isinstance(value, str) or not value.strip():
        raise _RowError(f"{key!r} must be a file path (a non-empty string), got {value!r}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise _RowError(f"{key} {value!r} {what} (looked for {path})")
    return path, value


def _load_image(value: Any, base: Path) -> tuple[np.ndarray, Path]:
    path, given = _resolve(value, "image", base)
    try:
        return np.asarray(load_image(path)), path  # (H, W, 3) uint8
    except InputError as e:
        raise _RowError(f"image {given!r}: {e}") from None


def _load_audio(value: Any, base: Path) -> tuple[AudioClip, Path]:
    path, given = _resolve(value, "audio", base)
    try:
        return load_audio(path), path
    except InputError as e:
        raise _RowError(f"audio {given!r}: {e}") from None


def _resample(clip: AudioClip) -> np.ndarray:
    """(n,) at the clip's rate -> (n',) float32 at SAMPLE_RATE."""
    return resample(clip.waveform[None], clip.sample_rate)[0]  # (1, n) -> (1, n')


def _check_boxes(boxes: list[list[float]], image: np.ndarray | None) -> None:
    if boxes and image is None:
        raise _RowError("'boxes' given but the row has no image")
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        h, w = image.shape[:2]
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise _RowError(f"box {i} {[x0, y0, x1, y1]} is not inside the {w}x{h} image "
                            "(need 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, in pixels)")


def _check_intervals(intervals: list[list[float]], clip: AudioClip | None) -> None:
    if intervals and clip is None:
        raise _RowError("'intervals' given but the row has no audio")
    slack = 1.0 / clip.sample_rate if intervals else 0.0  # one sample of rounding
    for i, (start, end) in enumerate(intervals):
        if start >= end:
            raise _RowError(f"interval {i} [{start}, {end}] must have start < end (seconds)")
        if start < 0 or end > clip.duration + slack:
            raise _RowError(f"interval {i} [{start}, {end}] is outside the {clip.duration:.3f} s clip")


def _check_phrases(value: Any, caption: str, lead: int, counts: Mapping[str, int]) -> list[dict]:
    """Spans are given against the raw caption; `lead` characters were stripped from its start."""
    if not isinstance(value, list):
        raise _RowError(f"'phrases' must be a list of objects, got {type(value).__name__}")
    out = []
    for i, p in enumerate(value):
        if not isinstance(p, dict):
            raise _RowError(f"phrase {i} must be an object like "
                            '{"span": [0, 12], "target": "object", "index": 0}, got ' + repr(p))
        unknown = sorted(set(p) - set(PHRASE_KEYS))
        if unknown:
            raise _RowError(f"phrase {i} has unknown key(s) {unknown}; valid keys: {list(PHRASE_KEYS)}")
        missing = [k for k in ("span", "target", "index") if k not in p]
        if missing:
            raise _RowError(f"phrase {i} is missing {missing}")
        span = p["span"]
        if (not isinstance(span, list) or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            raise _RowError(f"phrase {i} span must be two whole numbers [start, end], got {span!r}")
        start, end = span[0] - lead, span[1] - lead
        if not 0 <= start < end <= len(caption):
            raise _RowError(f"phrase {i} span {span} is outside the caption (which has {len(caption) + lead} "
                            "characters) or empty")
        target = p["target"]
        if target not in TARGETS:
            raise _RowError(f"phrase {i} target {target!r} must be one of {list(TARGETS)}")
        index, n = p["index"], counts[TARGETS[target]]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
            raise _RowError(f"phrase {i} index {index!r} is out of range: the row has {n} "
                            f"{TARGETS[target]}")
        text = caption[start:end]
        if "text" in p and p["text"] != text:
            raise _RowError(f"phrase {i} text {p['text']!r} does not match caption[{span[0]}:{span[1]}] = {text!r}")
        out.append({"span": [start, end], "target": target, "index": index, "text": text})
    return out


def _parse_row(line: str, number: int, base: Path) -> ManifestRow:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _RowError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _RowError(f"must be a JSON object like {{\"caption\": ..., \"image\": ...}}, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(MANIFEST_KEYS))
    if unknown:
        raise _RowError(f"unknown key(s) {unknown}; valid keys: {list(MANIFEST_KEYS)}")
    if "caption" not in obj:
        raise _RowError("'caption' is missing; every row needs a caption")
    try:
        caption = check_text(obj["caption"])
    except InputError as e:
        raise _RowError(f"caption: {e}") from None
    lead = len(obj["caption"]) - len(obj["caption"].lstrip())
    if obj.get("image") is None and obj.get("audio") is None:
        raise _RowError("give an 'image' or an 'audio' path (or both)")

    boxes = _pairs(obj.get("boxes", []), "boxes", 4)
    intervals = _pairs(obj.get("intervals", []), "intervals", 2)
    image, image_path = _load_image(obj["image"], base) if obj.get("image") is not None else (None, None)
    clip, audio_path = _load_audio(obj["audio"], base) if obj.get("audio") is not None else (None, None)
    _check_boxes(boxes, image)
    _check_intervals(intervals, clip)
    phrases = _check_phrases(obj.get("phrases", []), caption, lead,
                             {"boxes": len(boxes), "intervals": len(intervals)})
    return ManifestRow(caption=caption, image=image, audio=None if clip is None else _resample(clip),
                       sample_rate=None if clip is None else SAMPLE_RATE, boxes=boxes, intervals=intervals,
                       phrases=phrases, row=number, image_path=image_path, audio_path=audio_path)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------


def load_manifest(path: str | os.PathLike, *, strict: bool = False, progress: bool = True
                  ) -> tuple[list[ManifestRow], list[str]]:
    """(rows, errors). Each bad row is one error naming its line; `strict` raises on the first.

    Raises InputError when the manifest is missing or unreadable, or when no row is usable.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise InputError(f"manifest {path} {what}; give a .jsonl file with one JSON object per line, "
                         'e.g. {"caption": "a red circle", "image": "img/1.png"}')
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"manifest {path} could not be read as UTF-8 text ({e})") from None

    rows, errors = [], []
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#")]
    for number, line in tqdm(numbered, desc=f"manifest {path.name}", unit="row", disable=not progress):
        try:
            rows.append(_parse_row(line, number, path.parent))
        except _RowError as e:
            message = f"manifest {path.name} row {number}: {e}"
            if strict:
                raise InputError(message) from None
            errors.append(message)
    if not rows:
        if not errors:
            raise InputError(f"manifest {path} has no rows (only blank lines or # comments)")
        shown = "\n  ".join(errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise InputError(f"manifest {path} has no usable rows ({len(errors)} bad):\n  {shown}{more}")
    return rows, errors


def write_manifest(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write dicts as a JSONL manifest (one object per line); the folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dict(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def scene_to_manifest_row(scene, directory: str | os.PathLike, name: str,
                          relative_to: str | os.PathLike | None = None) -> dict:
    """Save a procedural scene's files (`scenes.save_scene`) and return its manifest dict.

    File paths are relative to `relative_to` (default `directory`): the folder the manifest
    will be written to.
    """
    from multimodal.data.scenes import save_scene

    paths = save_scene(scene, directory, name)
    base = Path(relative_to if relative_to is not None else directory)
    return {"caption": scene.caption,
            "image": Path(os.path.relpath(paths["image"], base)).as_posix(),
            "audio": Path(os.path.relpath(paths["audio"], base)).as_posix(),
            "boxes": [list(o["box"]) for o in scene.objects],
            "intervals": [[e["start"], e["end"]] for e in scene.events],
            "phrases": [dict(p) for p in scene.phrases]}
