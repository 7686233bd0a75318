"""Ground truth for grounding, read one way: `GroundTruth` with readers for a generated `Scene`,
a scene JSON written by `multimodal.data.scenes.save_scene` (+ its label PNG), the app's
uploaded JSON, and a manifest row (`multimodal.data.manifest.ManifestRow`).

The uploaded JSON format (the app's help documents it too):

    {"caption": "a red circle and a rising chirp",     # optional: only used for this caption
     "image_size": [H, W],                              # optional: pixels the boxes refer to
     "phrases": [{"span": [2, 14], "target": "object", "index": 0},   # char span in the caption
                 {"span": [19, 33], "target": "event", "index": 0}],
     "objects": [{"box": [x0, y0, x1, y1]}],           # or {"mask": [[0, 1, ...], ...]} rows
     "events":  [{"start": 0.5, "end": 1.2}]}          # seconds

A scene JSON has the same keys (plus a "masks" label PNG name); `load_ground_truth` uses its
masks instead of the boxes when the PNG is found. Scoring is `multimodal.analysis.grounding`:
give it `truth.phrases`, `truth.object_masks(size)` and `truth.events`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from multimodal.types import InputError


@dataclass
class GroundTruth:
    phrases: list[dict]  # {"span": (s, e), "target": "object" | "event", "index": i}
    objects: list[dict]  # {"box": (x0, y0, x1, y1)} or {"mask": (H, W) bool array}
    events: list[tuple[float, float]]  # seconds
    caption: str | None = None
    image_size: tuple[int, int] | None = None  # (H, W) the boxes refer to

    def object_masks(self, size: tuple[int, int] | None = None) -> list[torch.Tensor]:
        """Each object's (H, W) bool mask at `size` (default: `image_size`, else each mask's own).

        Boxes are in `image_size` pixels (in `size` pixels when `image_size` is unknown)."""
        out = []
        for obj in self.objects:
            target = size or self.image_size
            if target is None:
                if "mask" not in obj:
                    raise InputError("a box needs an image size to become a mask; give 'image_size' or the image")
                target = tuple(np.asarray(obj["mask"]).shape[:2])
            out.append(_object_mask(obj, self.image_size or target, target))
        return out


def _object_mask(obj: dict, gt_size: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """One object's (H, W) bool mask at `size`, from a box in `gt_size` pixels or a mask
    (resized by nearest neighbour; a mask already at `size` is used as it is)."""
    H, W = size
    if "mask" in obj:
        m = np.asarray(obj["mask"], dtype=bool)
        if m.shape == (H, W):
            return torch.from_numpy(m.copy())
        m = Image.fromarray(m.astype(np.uint8) * 255).resize((W, H), Image.NEAREST)
        return torch.from_numpy(np.asarray(m) > 127)
    gh, gw = gt_size
    x0, y0, x1, y1 = obj["box"]
    sx, sy = W / gw, H / gh
    mask = torch.zeros(H, W, dtype=torch.bool)
    mask[max(0, int(y0 * sy)):max(0, math.ceil(y1 * sy)), max(0, int(x0 * sx)):max(0, math.ceil(x1 * sx))] = True
    return mask


# ---------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------


def from_scene(scene) -> GroundTruth:
    """A generated `multimodal.data.scenes.Scene`: exact object masks at the image's size."""
    phrases = [{"span": (int(p["span"][0]), int(p["span"][1])), "target": p["target"], "index": int(p["index"])}
               for p in scene.phrases]
    objects = [{"mask": np.asarray(m, dtype=bool)} for m in scene.masks]
    events = [(float(e["start"]), float(e["end"])) for e in scene.events]
    size = tuple(int(v) for v in np.asarray(scene.masks).shape[-2:]) if len(objects) else None
    return GroundTruth(phrases, objects, events, getattr(scene, "caption", None), size)


def from_manifest_row(row) -> GroundTruth:
    """A `multimodal.data.manifest.ManifestRow` (validated there): boxes in pixels of its image."""
    phrases = [{"span": (int(p["span"][0]), int(p["span"][1])), "target": p["target"], "index": int(p["index"])}
               for p in row.phrases]
    objects = [{"box": tuple(float(v) for v in b)} for b in row.boxes]
    events = [(float(s), float(e)) for s, e in row.intervals]
    size = None if row.image is None else tuple(int(v) for v in np.asarray(row.image).shape[:2])
    return GroundTruth(phrases, objects, events, row.caption, size)


def load_scene_json(json_path: str | Path) -> GroundTruth:
    """A scene JSON of `save_scene` with its object masks read from the label PNG beside it
    (`load_ground_truth`, which must find them: a scene without its masks is refused)."""
    json_path = Path(json_path)
    gt = load_ground_truth(json_path)
    if not gt.objects or any("mask" not in o for o in gt.objects):
        raise InputError(f"scene {json_path.name}: its label PNG is missing, unreadable or does not hold one "
                         "mask per object")
    gt.image_size = tuple(int(v) for v in gt.objects[0]["mask"].shape)
    return gt


def _scene_masks(path: Path, d: dict, search: Sequence[str | Path]) -> np.ndarray | None:
    """(K, H, W) object masks of a `multimodal.data.scenes.save_scene` JSON, when its label PNG
    is beside it, or beside an identical JSON in `search` (an example the page sent back)."""
    name = d.get("masks")
    if not isinstance(name, str):
        return None
    candidates = [path]
    text = path.read_bytes()
    for folder in search:
        candidates += [p for p in Path(folder).glob("*.json") if p.read_bytes() == text] if Path(folder).is_dir() else []
    for json_path in candidates:
        if (json_path.parent / Path(name).name).is_file():
            from multimodal.data.scenes import load_scene_truth

            try:
                return load_scene_truth(json_path)["masks"]
            except Exception:  # an unreadable label PNG: the boxes still score
                return None
    return None


def load_ground_truth(path: str | Path, search: Sequence[str | Path] = ()) -> GroundTruth:
    """Read the uploaded JSON format (module docstring; scenes' JSON included: its object masks
    are used when the label PNG is beside it or beside an identical JSON in `search`).
    Raises InputError."""
    path = Path(path)
    name = path.name
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"ground truth {name} is not readable JSON ({e}); see the format in the help") from None
    if not isinstance(d, dict):
        raise InputError(f"ground truth {name} must be a JSON object with 'phrases', 'objects' and 'events'")
    try:
        phrases = []
        for p in d.get("phrases", []):
            s, e = (int(v) for v in p["span"])
            target = str(p.get("target", "object"))
            if target not in ("object", "event") or s >= e:
                raise ValueError(f"phrase {p}")
            phrases.append({"span": (s, e), "target": target, "index": int(p.get("index", 0))})
        objects = []
        for o in d.get("objects", []):
            if "box" in o:
                objects.append({"box": tuple(float(v) for v in o["box"][:4])})
            elif "mask" in o:
                objects.append({"mask": np.asarray(o["mask"], dtype=bool)})
            else:
                raise ValueError(f"object {o} has neither 'box' nor 'mask'")
        events = [(float(e["start"]), float(e["end"])) for e in d.get("events", [])]
        size = d.get("image_size")
        size = (int(size[0]), int(size[1])) if size else None
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise InputError(f"ground truth {name} does not follow the format ({e}); see the format in the help") from None
    for p in phrases:
        pool = objects if p["target"] == "object" else events
        if not 0 <= p["index"] < len(pool):
            raise InputError(f"ground truth {name}: phrase {p['span']} points at {p['target']} {p['index']}, "
                             f"but there are {len(pool)}")
    masks = _scene_masks(path, d, search)
    if masks is not None and len(masks) == len(objects):
        objects = [{"mask": m} for m in masks]  # exact shapes beat boxes
    caption = d.get("caption")
    return GroundTruth(phrases, objects, events, caption if isinstance(caption, str) else None, size)
