"""Procedural "scenes" with ground truth: shapes on textured backgrounds, sound events at known
times, and captions whose referring phrases are linked to their objects and events.

Deterministic by seed. Hard negatives change exactly one attribute and are checked to be
false for the scene. Everything is vectorised numpy: a scene takes a few milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from multimodal.errors import InputError
from multimodal.io import SAMPLE_RATE

# -- vocabulary -------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 180), "white": (245, 245, 245)}
SIZES = {"small": (9.0, 12.0), "large": (17.0, 22.0)}  # radius range in px at 128 px
EVENT_KINDS = ("tone", "chirp", "noise", "clicks")
PITCHES = {"low": 300.0, "mid": 800.0, "high": 2000.0}
DIRECTIONS = ("rising", "falling")
CHIRP_RANGE = (400.0, 3000.0)  # Hz
EVENT_ATTRIBUTES = {"tone": tuple(PITCHES), "chirp": DIRECTIONS, "noise": (None,), "clicks": (None,)}
CHANGE_TYPES = ("colour", "shape", "size", "pitch", "direction", "event_kind", "order")
# one event phrase of a two-event caption made to name the caption's other event ("a falling chirp then a
# falling chirp" where one falling chirp is heard; a scene never holds the same event twice). Drawn only
# when asked for (`hard_negative(..., repeat=True)`, `TrainConfig.repeat_negatives`), so the draws of
# CHANGE_TYPES, and everything trained or measured on them before, are unchanged
REPEAT = "repeat"


@dataclass(frozen=True)
class SceneConfig:
    image_size: int = 128
    min_objects: int = 2
    max_objects: int = 3
    duration: float = 3.0  # seconds
    min_events: int = 1
    max_events: int = 2
    sample_rate: int = SAMPLE_RATE
    noise_level: float = 0.02  # background noise RMS
    max_mentioned_objects: int = 2
    max_mentioned_events: int = 2
    size_word_probability: float = 0.5  # chance an object phrase names its size

    def __post_init__(self):
        if self.max_mentioned_objects < 0 or self.max_mentioned_events < 0:
            raise InputError("max_mentioned_objects and max_mentioned_events must be >= 0")
        if self.max_mentioned_objects == 0 and self.max_mentioned_events == 0:
            raise InputError("max_mentioned_objects = max_mentioned_events = 0 leaves the captions empty: let one "
                             "of them be >= 1 (0 for one of them: captions about the other modality only)")
        if not 1 <= self.min_objects <= self.max_objects or not 1 <= self.min_events <= self.max_events:
            raise InputError(f"objects {self.min_objects}..{self.max_objects} and events {self.min_events}.."
                             f"{self.max_events}: each needs 1 <= min <= max")


# One object, and the caption names it: a shape or colour word can only refer to that object
# (the training curriculum's scenes, and the probe's `--learn` images)
ONE_OBJECT = {"min_objects": 1, "max_objects": 1, "max_mentioned_objects": 1}


@dataclass
class Scene:
    image: np.ndarray  # (S, S, 3) uint8
    masks: np.ndarray  # (K, S, S) bool, one per object
    objects: list[dict]  # {shape, colour, size, box (x0, y0, x1, y1), centre (x, y), radius}
    audio: np.ndarray  # (n,) float32 in [-1, 1]
    events: list[dict]  # {kind, attribute, start, end} seconds
    caption: str
    phrases: list[dict]  # {span (start, end), target "object"|"event", index, text}
    seed: int = 0
    sample_rate: int = SAMPLE_RATE


# -- images -----------------------------------------------------------------------------


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float, angle: float) -> np.ndarray:
    """Boolean mask of a shape centred at 0 with radius r, on offset grids dx, dy."""
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        s = r * 0.82
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.05
    if shape == "cross":
        arm = r * 0.33
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "triangle":  # pointing up, inscribed in the circle
        top, bottom = -r, r * 0.6
        half = (dy - top) / (bottom - top) * r * 0.95
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half)
    if shape == "star":  # five points
        rho = np.hypot(dx, dy)
        theta = np.arctan2(dy, dx) + angle
        edge = r * (0.45 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 3)
        return rho <= edge
    raise ValueError(shape)


def _background(rng: np.random.Generator, S: int) -> np.ndarray:
    """Low-saturation gradient + low-contrast stripes or checks + noise: (S, S, 3) float."""
    base = rng.uniform(70, 160)
    tint = rng.uniform(-12, 12, size=3)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    g = rng.uniform(-25, 25) * xx + rng.uniform(-25, 25) * yy
    pattern = rng.integers(3)
    period = rng.uniform(6, 20)
    if pattern == 0:
        a = rng.uniform(0, np.pi)
        tex = np.sin((np.cos(a) * xx + np.sin(a) * yy) * S * 2 * np.pi / period)
    elif pattern == 1:
        tex = np.sign(np.sin(xx * S * np.pi / period) * np.sin(yy * S * np.pi / period))
    else:
        tex = np.zeros_like(xx)
    tex = tex * rng.uniform(4, 10)
    img = base + g + tex
    img = img[..., None] + tint[None, None, :] + rng.normal(0, 4, size=(S, S, 3))
    return img


def _render_image(rng: np.random.Generator, cfg: SceneConfig) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    S = cfg.image_size
    scale = S / 128.0
    img = _background(rng, S)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=n, replace=False)]
    objects, masks = [], []
    placed: list[tuple[float, float, float]] = []
    for colour, shape in chosen:
        size = str(rng.choice(list(SIZES)))
        for _ in range(200):
            r = rng.uniform(*SIZES[size]) * scale
            cx, cy = rng.uniform(r + 2, S - r - 2, size=2)
            if all(np.hypot(cx - x, cy - y) > r + q + 4 * scale for x, y, q in placed):
                break
        else:
            size, r = "small", SIZES["small"][0] * scale  # crowded: fall back to the smallest
            cx, cy = rng.uniform(r + 2, S - r - 2, size=2)
        placed.append((cx, cy, r))
        x0, x1 = int(max(0, np.floor(cx - r - 1))), int(min(S, np.ceil(cx + r + 2)))
        y0, y1 = int(max(0, np.floor(cy - r - 1))), int(min(S, np.ceil(cy + r + 2)))
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        local = _shape_mask(shape, xx + 0.5 - cx, yy + 0.5 - cy, r, rng.uniform(0, 2 * np.pi))
        mask = np.zeros((S, S), dtype=bool)
        mask[y0:y1, x0:x1] = local
        rgb = np.array(COLOURS[colour], dtype=np.float32) + rng.normal(0, 6, size=3)
        img[mask] = rgb + rng.normal(0, 3, size=(int(mask.sum()), 3))
        for prev in masks:  # later objects are drawn on top
            prev &= ~mask
        masks.append(mask)
        ys, xs = np.nonzero(mask)
        objects.append({"shape": shape, "colour": colour, "size": size,
                        "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                        "centre": [float(cx), float(cy)], "radius": float(r)})
    return np.clip(img, 0, 255).astype(np.uint8), np.stack(masks), objects


# -- audio ------------------------------------------------------------------------------


def _event_wave(rng: np.random.Generator, kind: str, attribute: str | None, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    if kind == "tone":
        w = np.sin(2 * np.pi * PITCHES[attribute] * t + rng.uniform(0, 2 * np.pi))
    elif kind == "chirp":
        f0, f1 = CHIRP_RANGE if attribute == "rising" else CHIRP_RANGE[::-1]
        T = n / sr
        k = np.log(f1 / f0) / T
        w = np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)
    elif kind == "noise":
        w = rng.normal(0, 0.5, n)
    else:  # clicks: short decaying impulses at a steady rate
        w = np.zeros(n)
        rate = rng.uniform(10, 16)
        click = np.exp(-np.arange(int(0.004 * sr)) / (0.0008 * sr)) * np.sin(2 * np.pi * 3000 * np.arange(int(0.004 * sr)) / sr)
        for start in np.arange(0, n - click.size, sr / rate).astype(int):
            w[start:start + click.size] += click * 1.5
    fade = min(int(0.01 * sr), n // 4)
    env = np.ones(n)
    env[:fade] = np.linspace(0, 1, fade)
    env[-fade:] = np.linspace(1, 0, fade)
    return w * env


def _render_audio(rng: np.random.Generator, cfg: SceneConfig) -> tuple[np.ndarray, list[dict]]:
    sr, n_total = cfg.sample_rate, int(cfg.duration * cfg.sample_rate)
    audio = rng.normal(0, cfg.noise_level, n_total)
    n = int(rng.integers(cfg.min_events, cfg.max_events + 1))
    kinds = [(k, a) for k in EVENT_KINDS for a in EVENT_ATTRIBUTES[k]]
    chosen = [kinds[i] for i in rng.choice(len(kinds), size=n, replace=False)]
    slot = (cfg.duration - 0.2) / n
    events = []
    for i, (kind, attr) in enumerate(chosen):
        length = rng.uniform(0.4, min(0.8, slot - 0.15))
        start = 0.1 + i * slot + rng.uniform(0.05, max(0.06, slot - length - 0.05))
        a, b = int(start * sr), int((start + length) * sr)
        audio[a:b] += rng.uniform(0.25, 0.45) * _event_wave(rng, kind, attr, b - a, sr)
        events.append({"kind": kind, "attribute": attr, "start": round(a / sr, 4), "end": round(b / sr, 4)})
    return np.clip(audio, -1, 1).astype(np.float32), events


# -- captions ---------------------------------------------------------------------------


def object_phrase(obj: dict, with_size: bool) -> str:
    return f"a {obj['size']} {obj['colour']} {obj['shape']}" if with_size else f"a {obj['colour']} {obj['shape']}"


def event_phrase(ev: dict) -> str:
    return {"tone": f"a {ev['attribute']} tone", "chirp": f"a {ev['attribute']} chirp",
            "noise": "a noise burst", "clicks": "a click train"}[ev["kind"]]


JOINERS = ("and", "with", "then")  # what compose puts between phrases


def caption_words() -> list[str]:
    """Every word a scene caption (or a hard negative of one) can hold, sorted: the whole vocabulary
    a model trained on these scenes has seen."""
    words = {"a", *JOINERS, *SIZES, *COLOURS, *SHAPES}
    for kind, attributes in EVENT_ATTRIBUTES.items():
        for attribute in attributes:
            words |= set(event_phrase({"kind": kind, "attribute": attribute}).split())
    return sorted(words)


def compose(obj_parts: list[tuple[str, int]], ev_parts: list[tuple[str, int]]) -> tuple[str, list[dict]]:
    """Objects joined by ' and ', events by ' then ', the two groups by ' with '."""
    caption, phrases = "", []

    def add(text, target, index):
        nonlocal caption
        phrases.append({"span": [len(caption), len(caption) + len(text)], "target": target,
                        "index": index, "text": text})
        caption += text

    for i, (text, idx) in enumerate(obj_parts):
        if i:
            caption += " and "
        add(text, "object", idx)
    if obj_parts and ev_parts:
        caption += " with "
    for i, (text, idx) in enumerate(ev_parts):
        if i:
            caption += " then "
        add(text, "event", idx)
    return caption, phrases


def _describe(objects, events, mentioned_objs, sizes_named, mentioned_events):
    obj_parts = [(object_phrase(objects[i], s), i) for i, s in zip(mentioned_objs, sizes_named)]
    ev_parts = [(event_phrase(events[i]), i) for i in mentioned_events]
    return compose(obj_parts, ev_parts)


def generate_scene(seed: int, cfg: SceneConfig = SceneConfig()) -> Scene:
    rng = np.random.default_rng(seed)
    image, masks, objects = _render_image(rng, cfg)
    audio, events = _render_audio(rng, cfg)
    mentioned_objs, sizes_named, mentioned_events = [], [], []
    if cfg.max_mentioned_objects:  # 0: captions about the sound only
        k = int(rng.integers(1, min(cfg.max_mentioned_objects, len(objects)) + 1))
        mentioned_objs = sorted(rng.choice(len(objects), size=k, replace=False).tolist())
        rng.shuffle(mentioned_objs)
        sizes_named = [bool(rng.random() < cfg.size_word_probability) for _ in mentioned_objs]
    if cfg.max_mentioned_events:  # 0: captions about the picture only
        e = int(rng.integers(1, min(cfg.max_mentioned_events, len(events)) + 1))
        mentioned_events = sorted(rng.choice(len(events), size=e, replace=False).tolist())  # temporal order
    caption, phrases = _describe(objects, events, mentioned_objs, sizes_named, mentioned_events)
    return Scene(image, masks, objects, audio, events, caption, phrases, seed, cfg.sample_rate)


# -- hard negatives ---------------------------------------------------------------------


def _parts(scene: Scene) -> tuple[list[dict], list[dict]]:
    """The caption's object and event parts as editable dicts, in caption order."""
    objs, evs = [], []
    for p in scene.phrases:
        if p["target"] == "object":
            o = scene.objects[p["index"]]
            objs.append({"index": p["index"], "colour": o["colour"], "shape": o["shape"], "size": o["size"],
                         "with_size": p["text"].count(" ") == 3})
        else:
            ev = scene.events[p["index"]]
            evs.append({"index": p["index"], "kind": ev["kind"], "attribute": ev["attribute"]})
    return objs, evs


def _candidate_changes(scene: Scene, objs: list[dict], evs: list[dict], repeat: bool = False) -> dict[str, list[tuple]]:
    """Every single-attribute change that makes the caption false, grouped by type (with `repeat`,
    REPEAT too)."""
    have_cs = {(o["colour"], o["shape"]) for o in scene.objects}
    have_ev = {(e["kind"], e["attribute"]) for e in scene.events}
    out: dict[str, list[tuple]] = {t: [] for t in CHANGE_TYPES}
    for i, o in enumerate(objs):
        out["colour"] += [(i, c) for c in COLOURS if c != o["colour"] and (c, o["shape"]) not in have_cs]
        out["shape"] += [(i, s) for s in SHAPES if s != o["shape"] and (o["colour"], s) not in have_cs]
        if o["with_size"]:
            out["size"].append((i, "large" if o["size"] == "small" else "small"))
    for i, e in enumerate(evs):
        if e["kind"] == "tone":
            out["pitch"] += [(i, p) for p in PITCHES if p != e["attribute"] and ("tone", p) not in have_ev]
        if e["kind"] == "chirp":
            d = "falling" if e["attribute"] == "rising" else "rising"
            if ("chirp", d) not in have_ev:
                out["direction"].append((i, d))
        out["event_kind"] += [(i, (k, a)) for k in EVENT_KINDS if k != e["kind"]
                              for a in EVENT_ATTRIBUTES[k] if (k, a) not in have_ev]
    if len(evs) == 2:
        out["order"].append((0, None))
        if repeat:
            out[REPEAT] = [(i, (evs[1 - i]["kind"], evs[1 - i]["attribute"])) for i in (0, 1)]
    return {t: c for t, c in out.items() if c}


def change_kinds(scene: Scene, repeat: bool = False) -> list[str]:
    """The kinds of one-attribute change (CHANGE_TYPES, and REPEAT with `repeat`) that can make this
    scene's caption false."""
    return list(_candidate_changes(scene, *_parts(scene), repeat=repeat))


def change_key(kind: str, before: Any, after: Any) -> str:
    """One change's name within its kind, as `NegativeMining` tallies it: "shape:star>cross",
    "event_kind:clicks>chirp falling", "order"."""
    if kind == "order":
        return kind
    name = (lambda v: " ".join(str(x) for x in v if x is not None) if isinstance(v, (list, tuple)) else str(v))
    return f"{kind}:{name(before)}>{name(after)}"


def _before(kind: str, i: int, objs: list[dict], evs: list[dict]) -> Any:
    """What change `kind` at part `i` replaces (the value `change["before"]` records)."""
    if kind in ("colour", "shape", "size"):
        return objs[i][kind]
    if kind in ("pitch", "direction"):
        return evs[i]["attribute"]
    if kind in ("event_kind", REPEAT):
        return [evs[i]["kind"], evs[i]["attribute"]]
    return None  # order


def hard_negative(scene: Scene, rng: np.random.Generator, change_type: str | None = None,
                  type_weights: Mapping[str, float] | None = None,
                  binding: float = 0.0, repeat: bool = False,
                  value_weights: Mapping[str, float] | None = None) -> tuple[str, list[dict], dict]:
    """(caption, phrases, change): the scene's caption with exactly one attribute changed so it is false.

    The kind of change is `change_type`, or drawn among the kinds this scene allows: uniformly,
    or in proportion to `type_weights` (kinds it does not name weigh 1). Phrases of the negative
    point at the scene's referents where they still exist; a changed phrase keeps the index of
    the object/event it was made from. With probability `binding`, a colour or shape change takes
    a value that another object in the scene has (when one allows it), so the negative names
    only things that are present, and only where each attribute is tells it apart. With `repeat`
    (or `change_type = REPEAT`), a two-event caption may also name one of its events twice (REPEAT).
    With `value_weights`, the change within the kind is drawn in proportion to the weight of its
    `change_key` rather than uniformly (a change it does not name weighs what it gives its kind,
    else 1); the change's key is `change["key"]` either way.
    """
    objs, evs = _parts(scene)
    options = _candidate_changes(scene, objs, evs, repeat=repeat or change_type == REPEAT)
    if change_type is not None:
        if change_type not in options:
            raise ValueError(f"no {change_type!r} change possible for this scene")
        kind = change_type
    elif type_weights:
        w = np.array([float(type_weights.get(k, 1.0)) for k in options])
        kind = list(options)[int(rng.choice(len(options), p=w / w.sum()))]
    else:
        kind = list(options)[int(rng.integers(len(options)))]
    choices = options[kind]
    if binding and kind in ("colour", "shape") and rng.random() < binding:
        present = [(i, v) for i, v in choices if any(o[kind] == v for o in scene.objects)]
        choices = present or choices
    w = None
    if value_weights is not None and len(choices) > 1:
        unseen = float(value_weights.get(kind, 1.0))
        w = np.array([float(value_weights.get(change_key(kind, _before(kind, i, objs, evs), v), unseen))
                      for i, v in choices])
    if w is not None and w.sum() > 0:
        i, value = choices[int(rng.choice(len(choices), p=w / w.sum()))]
    else:
        i, value = choices[int(rng.integers(len(choices)))]
    return _negative(kind, i, value, objs, evs)


def every_negative(scene: Scene, kind: str) -> list[tuple[str, list[dict], dict]]:
    """Every one-attribute change of `kind` that makes the scene's caption false, as `hard_negative`
    makes them ((caption, phrases, change) each; [] when the scene allows none)."""
    objs, evs = _parts(scene)
    options = _candidate_changes(scene, objs, evs, repeat=kind == REPEAT)
    return [_negative(kind, i, value, *_parts(scene)) for i, value in options.get(kind, [])]


def _negative(kind: str, i: int, value, objs: list[dict], evs: list[dict]) -> tuple[str, list[dict], dict]:
    """The caption of parts `objs`, `evs` with change `kind` made at part `i` (to `value`): (caption, phrases,
    change). Changes `objs` and `evs` in place."""
    before = _before(kind, i, objs, evs)
    change = {"type": kind, "key": change_key(kind, before, value)}
    if kind in ("colour", "shape", "size"):
        change.update(phrase=i, before=before, after=value)
        objs[i][kind] = value
    elif kind in ("pitch", "direction"):
        change.update(phrase=len(objs) + i, before=before, after=value)
        evs[i]["attribute"] = value
    elif kind in ("event_kind", REPEAT):
        change.update(phrase=len(objs) + i, before=before, after=list(value))
        evs[i]["kind"], evs[i]["attribute"] = value
    else:  # order
        evs = evs[::-1]
        change.update(before=[e["index"] for e in evs[::-1]], after=[e["index"] for e in evs])
    obj_parts = [(object_phrase(o, o["with_size"]), o["index"]) for o in objs]
    ev_parts = [(event_phrase(e), e["index"]) for e in evs]
    caption, phrases = compose(obj_parts, ev_parts)
    return caption, phrases, change


def caption_is_true(scene: Scene, caption_objects: list[dict], caption_events: list[dict]) -> bool:
    """Ground-truth check: every object phrase names an object; the event phrases name distinct events,
    heard in that order (so "a chirp then a chirp" needs two chirps)."""
    for o in caption_objects:
        if not any(x["colour"] == o["colour"] and x["shape"] == o["shape"]
                   and (not o.get("with_size") or x["size"] == o["size"]) for x in scene.objects):
            return False
    after = -1.0  # each event phrase: the first matching event heard after the previous phrase's
    for e in caption_events:
        hits = [x["start"] for x in scene.events if x["kind"] == e["kind"] and x["attribute"] == e["attribute"]
                and x["start"] > after]
        if not hits:
            return False
        after = min(hits)
    return True


def parse_caption(caption: str) -> tuple[list[dict], list[dict]]:
    """Inverse of `compose` for captions this generator writes."""
    obj_text, _, ev_text = caption.partition(" with ")
    objs = []
    for part in filter(None, obj_text.split(" and ")):
        words = part.split()[1:]
        if len(words) == 3:
            objs.append({"size": words[0], "colour": words[1], "shape": words[2], "with_size": True})
        else:
            objs.append({"colour": words[0], "shape": words[1], "with_size": False})
    evs = []
    for part in filter(None, ev_text.split(" then ")):
        w = part.split()
        if w[-1] == "tone":
            evs.append({"kind": "tone", "attribute": w[1]})
        elif w[-1] == "chirp":
            evs.append({"kind": "chirp", "attribute": w[1]})
        elif w[-1] == "burst":
            evs.append({"kind": "noise", "attribute": None})
        else:
            evs.append({"kind": "clicks", "attribute": None})
    return objs, evs


VOCAB = sorted({"a", "and", "with", "then", "tone", "chirp", "noise", "burst", "click", "train",
                *SHAPES, *COLOURS, *SIZES, *PITCHES, *DIRECTIONS})


# -- files ------------------------------------------------------------------------------


def save_scene(scene: Scene, directory: str | Path, name: str = "scene") -> dict[str, Path]:
    """name.png, name.wav (16-bit PCM), name.json (caption, phrases, objects, events) and
    name_masks.png (object k has pixel value k + 1)."""
    import soundfile as sf

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"image": directory / f"{name}.png", "audio": directory / f"{name}.wav",
             "json": directory / f"{name}.json", "masks": directory / f"{name}_masks.png"}
    Image.fromarray(scene.image).save(paths["image"])
    sf.write(paths["audio"], scene.audio, scene.sample_rate, subtype="PCM_16")
    labels = np.zeros(scene.masks.shape[1:], dtype=np.uint8)
    for k, m in enumerate(scene.masks):
        labels[m] = k + 1
    Image.fromarray(labels).save(paths["masks"])
    paths["json"].write_text(json.dumps({
        "format": "multimodal-scene/1", "seed": scene.seed, "caption": scene.caption,
        "phrases": scene.phrases, "objects": scene.objects, "events": scene.events,
        "image": paths["image"].name, "audio": paths["audio"].name, "masks": paths["masks"].name,
        "sample_rate": scene.sample_rate}, indent=1))
    return paths


def load_scene_truth(json_path: str | Path) -> dict:
    """The JSON of `save_scene` plus `masks` (K, H, W) bool read from the label PNG."""
    json_path = Path(json_path)
    gt = json.loads(json_path.read_text())
    labels = np.asarray(Image.open(json_path.parent / gt["masks"]))
    gt["masks"] = np.stack([labels == k + 1 for k in range(len(gt["objects"]))]) if gt["objects"] else None
    return gt
