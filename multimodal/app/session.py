"""The app's handlers and the plain functions under them: one loaded model, named handlers
(`App.run`, `App.view`, `App.tokens`) that tests call without a browser or a server.

Examples come from a folder (the bundled `multimodal.inference.ASSETS` by default): files that
share a stem (after dropping a trailing `_image`/`_audio`/`_caption`/`_text`/`_gt`/`_truth`/
`_ground_truth`; `*_masks.png` label maps are not examples) form one example: an image
(.png/.jpg), a clip (.wav/.flac/.ogg), a caption (.txt, or the JSON's "caption") and ground
truth (.json). No files, no examples.

Ground truth (optional, per example or uploaded) is JSON in the format documented in
`multimodal.data.truth` (a scene JSON from `save_scene` is read too) and read by its
`load_ground_truth` (re-exported here).
Grounding is `multimodal.analysis.grounding.phrase_grounding`, the same definition as
`multimodal eval`: a phrase's maps are the mean over the text tokens its span covers; objects
are scored with the pointing game (15 px tolerance, at the uploaded image's own resolution: no
downscaling, so a 128 px scene scores exactly as in eval; the pointing game checks only the
disk around each peak, so a 1024x1024 upload costs about 0.1 s) and the energy inside the mask
or box, events with temporal pointing (one time-column spacing of tolerance) and the attention
mass inside the interval. Both pointing games are also read strictly (the peak on the object /
inside the event), from the same peak.
"""

from __future__ import annotations

import atexit
import csv
import html
import json
import logging
import math
import re
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import gradio as gr
import numpy as np
import pandas as pd
import soundfile as sf
import torch
from PIL import Image

from multimodal import inference
from multimodal.analysis.grounding import phrase_grounding
from multimodal.analysis.metrics import entropy_per_query, head_metric_table
from multimodal.app.limits import (APP_LIMITS, KEEP_OUTPUT_SECONDS, MAX_OUTPUT_DIRS, MAX_TEXT_CHARS, THUMB_SIDE)
from multimodal.data.truth import GroundTruth, load_ground_truth
from multimodal.analysis.familiarity import Familiarity
from multimodal.analysis.relevance import fusion_rollout
from multimodal.drawing import RELEVANCE_LABEL, ROLLOUT_LABEL, render_layer, write_all, write_encoder_maps
from multimodal.inference import Inputs, describe_model, load_inputs
from multimodal.io import AudioClip
from multimodal.model import MultimodalModel, is_checkpoint
from multimodal.overlays import text_html, text_panels
from multimodal.overlays.common import colorbar, grid, save_png, value_range
from multimodal.types import AttentionMaps, InputError, TextGeometry

log = logging.getLogger("multimodal.demo")

TEXT_CONCENTRATION_NOTE = (
    "<b>Text highlight = how concentrated each head's attention is</b>, per query token: "
    "1 &minus; entropy / log(number of keys) (1 = all weight on one key, 0 = spread evenly). The text is the "
    "query side of this model, so no head attends <i>to</i> it. Below: the mean over heads (hover a token for "
    "its value), then every head.")
TEXT_ATTENTION_NOTE = ("<b>Text highlight = attention on each token</b>; below: the mean over heads (hover a token "
                       "for its value), then every head.")
MEAN_TOKEN = "all tokens (mean)"
MEAN_QUERY = "all queries (mean)"
TIE_SEED = 0  # random tie-breaking in the pointing games is seeded: same inputs, same table


# ---------------------------------------------------------------------------------------
# Heads and query tokens: the page's choices
# ---------------------------------------------------------------------------------------


def head_choices(layers: int, heads: int) -> list[str]:
    return [f"L{l} H{h}" for l in range(layers) for h in range(heads)]


def head_mask_from(off: Sequence[str] | None, layers: int, heads: int) -> torch.Tensor | None:
    """["L0 H2", ...] switched off -> (layers, heads) mask of 1 (kept) / 0 (off), None when all kept."""
    if not off:
        return None
    mask = torch.ones(layers, heads)
    for choice in off:
        m = re.fullmatch(r"\s*L(\d+)\s*H(\d+)\s*", str(choice))
        if not m or int(m[1]) >= layers or int(m[2]) >= heads:
            raise InputError(f"unknown head {choice!r}; heads are named like 'L0 H2' (layers 0..{layers - 1}, "
                             f"heads 0..{heads - 1})")
        mask[int(m[1]), int(m[2])] = 0.0
    return mask


def query_labels(maps: AttentionMaps, item: int = 0) -> list[tuple[int, str]]:
    """(query index, label) for every content query: "3: red" for text tokens, "latent 3" otherwise."""
    idx = torch.nonzero(maps.content_queries()[item]).flatten().tolist()
    geom = maps.query_geometry
    if isinstance(geom, TextGeometry):
        return [(i, f"{i}: {geom.tokens[item][i]}") for i in idx]
    name = "latent" if maps.query_source == "latents" else f"{maps.query_source} query"
    return [(i, f"{name} {i}") for i in idx]


def mean_label(query_source: str) -> str:
    return MEAN_TOKEN if query_source == "text" else MEAN_QUERY


def parse_query(choice: Any, valid: Sequence[int]) -> int | None:
    """Dropdown value ("3: red", "3", 3 or the mean label) -> query index, None for the mean."""
    if choice is None or str(choice).strip() in ("", MEAN_TOKEN, MEAN_QUERY):
        return None
    m = re.match(r"\s*(?:latent\s+|\w+ query\s+)?(\d+)\b", str(choice))
    if not m or int(m[1]) not in valid:
        raise InputError(f"query {choice!r} is not one of this input's tokens; pick one from the list "
                         f"or '{MEAN_TOKEN}'")
    return int(m[1])


# ---------------------------------------------------------------------------------------
# Per-head metrics: multimodal.analysis.metrics, shown under short names
# ---------------------------------------------------------------------------------------

METRIC_COLUMNS = {  # head_metric_table key -> column in the page (others are left out)
    "entropy": "entropy", "confidence": "confidence", "share_text": "share text", "share_image": "share image",
    "share_audio": "share audio",
}


def head_stats(maps: AttentionMaps, layer: int) -> dict[str, np.ndarray]:
    """Per head `(h,)`, over content queries (no CLS/SEP): normalised entropy (0 = one key,
    1 = uniform over the real keys), confidence (mean largest weight), each key modality's
    share of the mass, and for competing queries the share of the keys they claimed before their
    rows were renormalised (a faint query's row looks as peaked as a strong one's)."""
    rows = head_metric_table(maps, layer, content_queries=True)
    stats = {shown: np.array([r[key] for r in rows], dtype=np.float64)
             for key, shown in METRIC_COLUMNS.items() if rows and key in rows[0]}
    if maps.claimed is not None and layer in maps.claimed:  # mean over the content queries of item 0
        content = maps.content_queries()[0].to(maps.claimed[layer].device)
        stats["claimed share"] = maps.claimed[layer][0][:, content].float().mean(-1).cpu().numpy()
    return stats


def concentration(maps: AttentionMaps, layer: int, item: int = 0) -> np.ndarray:
    """`(h, Nq)` 1 - normalised entropy of each query's row: 1 = all weight on one key, 0 = uniform."""
    h = entropy_per_query(maps.weights[layer], maps.key_mask, normalise=True)[item]  # (h, Nq)
    return (1.0 - h).clamp(0, 1).numpy()


# ---------------------------------------------------------------------------------------
# Ground truth (optional): objects and events that phrases of the caption refer to
# ---------------------------------------------------------------------------------------


def _same_caption(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def grounding_scores(maps: AttentionMaps, layer: int, gt: GroundTruth, image_size: tuple[int, int] | None,
                     item: int = 0) -> dict[str, np.ndarray]:
    """Per head `(h,)`: mean over the caption's phrases of pointing / energy (objects) and
    interval mass / temporal pointing (events), by `multimodal.analysis.grounding.phrase_grounding`
    (eval's definition). Object masks are scored at `image_size`, the image's own pixels.
    Needs text-token queries."""
    if not isinstance(maps.query_geometry, TextGeometry) or not gt.phrases:
        return {}
    masks = gt.object_masks(image_size) if image_size is not None else None
    gen = torch.Generator().manual_seed(TIE_SEED)
    names = {"image": (("pointing image", "pointing"), ("pointing image, strict", "pointing_strict"),
                       ("energy in object", "energy")),
             "audio": (("mass in event", "energy"), ("pointing audio", "pointing"),
                       ("pointing audio, strict", "pointing_strict"))}
    cols: dict[str, list[torch.Tensor]] = {}
    for scored in phrase_grounding(maps, layer, item, gt.phrases, masks, gt.events, gen):
        for column, metric in names[scored["modality"]]:
            cols.setdefault(column, []).append(scored[metric].float())
    return {k: torch.stack(v).mean(0).numpy() for k, v in cols.items()}


def _round(x) -> float | None:
    """3 decimals; a value under 0.001 keeps 2 significant digits (a head claiming 0.0003 of the keys does
    not read as 0)."""
    x = float(x)
    if not math.isfinite(x):
        return None  # NaN: nothing to average (e.g. no mass there)
    return round(x, 3) if x == 0 or abs(x) >= 0.001 else float(f"{x:.2g}")


def metrics_rows(maps: AttentionMaps, off: torch.Tensor | None, gt: GroundTruth | None,
                 image_size: tuple[int, int] | None) -> tuple[list[str], list[list]]:
    """The per-head table: (headers, rows), one row per head of every layer."""
    headers, rows = None, []
    for layer in maps.layers:
        stats = head_stats(maps, layer)
        if gt is not None:
            stats.update(grounding_scores(maps, layer, gt, image_size))
        names = list(stats)
        if headers is None:
            headers = ["head"] + names
        for i, h in enumerate(maps.heads[layer]):
            is_off = off is not None and float(off[layer, h]) == 0.0
            rows.append([f"L{layer} H{h}" + (" (off)" if is_off else "")] + [_round(stats[n][i]) for n in names])
    return headers or ["head"], rows


# ---------------------------------------------------------------------------------------
# Examples from assets/
# ---------------------------------------------------------------------------------------

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
AUDIO_EXT = (".wav", ".flac", ".ogg", ".mp3")
ROLE_SUFFIX = re.compile(r"[_-](image|img|audio|sound|caption|text|gt|truth|ground[_-]truth|meta)$", re.I)


def find_examples(folder: str | Path | None) -> list[list[str | None]]:
    """[image, audio, caption, ground-truth JSON] rows from files sharing a stem (see module doc)."""
    folder = Path(folder) if folder else None
    if folder is None or not folder.is_dir():
        return []
    groups: dict[str, dict[str, Path]] = {}
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        ext = f.suffix.lower()
        if re.search(r"[_-]masks?$", f.stem, re.I):
            continue  # object label maps that go with a ground-truth JSON
        role = ("image" if ext in IMAGE_EXT else "audio" if ext in AUDIO_EXT else
                "caption" if ext == ".txt" else "gt" if ext == ".json" else None)
        if role is None:
            continue
        groups.setdefault(ROLE_SUFFIX.sub("", f.stem), {}).setdefault(role, f)
    rows = []
    for stem, g in sorted(groups.items()):
        if "image" not in g and "audio" not in g:
            continue
        caption = None
        if "caption" in g:
            caption = g["caption"].read_text(encoding="utf-8", errors="replace").strip()
        gt = g.get("gt")
        if gt is not None:
            try:
                d = json.loads(gt.read_text(encoding="utf-8"))
                caption = caption or (d.get("caption") if isinstance(d, dict) else None)
            except (OSError, ValueError):
                gt = None
        rows.append([str(g["image"]) if "image" in g else None, str(g["audio"]) if "audio" in g else None,
                     caption or "", str(gt) if gt else None])
    return rows


# ---------------------------------------------------------------------------------------
# Per-request output folders (downloads), pruned as new ones are made
# ---------------------------------------------------------------------------------------


class OutputDirs:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="multimodal-demo-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        atexit.register(shutil.rmtree, self.root, True)

    def new(self) -> Path:
        with self._lock:
            self.prune()
            return Path(tempfile.mkdtemp(prefix="req-", dir=self.root))

    def prune(self) -> None:
        dirs = sorted((d for d in self.root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)
        now = time.time()
        for i, d in enumerate(dirs):
            if now - d.stat().st_mtime > KEEP_OUTPUT_SECONDS or len(dirs) - i >= MAX_OUTPUT_DIRS:
                shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# The app: one model, loaded once; handlers are plain methods
# ---------------------------------------------------------------------------------------


@dataclass
class Result:
    """What a run leaves in the session, so layer / token changes redraw without the model."""

    maps: AttentionMaps
    image: Image.Image | None  # thumbnail for drawing
    audio: AudioClip | None
    queries: list[tuple[int, str]]
    out_dir: Path
    files: dict[int | None, list[Path]]  # query index -> files written for it
    extra_files: list[Path]
    inputs: Inputs | None = None  # what the model ran on: the encoder view runs the encoders on it again
    model_name: str | None = None  # which of the app's models made it
    truth: GroundTruth | None = None  # the ground truth it was scored against, if any


def _error(e: Exception | str, uploads: Sequence[Any] = ()) -> gr.Error:
    """A readable message in the page (gr.Error renders HTML, so user text is escaped). The server's
    copies of uploaded files are named by the user's file name, never by their path on the server."""
    message = str(e)
    for path in uploads:
        if isinstance(path, (str, Path)) and str(path):
            message = message.replace(str(path), Path(path).name)
    return gr.Error(html.escape(message, quote=False), title="Cannot run on these inputs", print_exception=False)



@dataclass
class Bench:
    """One loaded model and what the page shows about it."""

    name: str
    model: MultimodalModel
    source: Path | None
    info: str  # the model line (markdown)
    heads: list[str]  # "L0 H1", ... for the ablation checkboxes
    familiarity: Familiarity | None  # how far uploads are from its training scenes (scene-trained models)

    @classmethod
    def of(cls, name: str, model: MultimodalModel, source: str | Path | None) -> "Bench":
        model = model.eval()
        return cls(name, model, Path(source) if source else None, describe_model(model, source),
                   head_choices(model.cfg.layers, model.cfg.heads), Familiarity.for_model(model))


def model_choices(models_dir: str | Path | None) -> dict[str, Path]:
    """name -> checkpoint folder: the embedded models (`inference.EMBEDDED`), and every checkpoint directly inside
    `models_dir` (a `train --out` folder, a copied checkpoint), by folder name."""
    found = inference.embedded_models()
    if models_dir is not None:
        folder = Path(models_dir)
        if not folder.is_dir():
            raise InputError(f"--models {folder}: no such folder; give a folder holding checkpoint folders")
        for d in sorted(p for p in folder.iterdir() if p.is_dir() and is_checkpoint(p)):
            found.setdefault(d.name, d)
    return found


class App:
    """The handlers. One model is loaded at start; with `models_dir`, each visitor can switch to
    any checkpoint there (loaded on first use, then kept) without a restart: the choice is per
    session, carried by the page's hidden state, and an API client that never chooses gets the
    model loaded at start."""

    def __init__(self, model: MultimodalModel, source: str | Path | None = None,
                 examples_dir: str | Path | None = inference.ASSETS, output_root: str | Path | None = None,
                 models_dir: str | Path | None = None):
        self.examples_dir = Path(examples_dir) if examples_dir else None
        self.examples = find_examples(examples_dir)
        self.outputs = OutputDirs(output_root)
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe across threads
        self._load_lock = threading.Lock()
        choices = model_choices(models_dir)
        start = next((n for n, p in choices.items() if source and p.resolve() == Path(source).resolve()),
                     Path(source).name if source else "built from specs")
        self.start = Bench.of(start, model, source)
        self.benches: dict[str, Bench] = {start: self.start}
        self.choices = {start: self.start.source, **{n: p for n, p in choices.items() if n != start}}

    # the model loaded at start (what API clients and tests that never choose get)
    @property
    def model(self) -> MultimodalModel:
        return self.start.model

    @property
    def info(self) -> str:
        return self.start.info

    @property
    def heads(self) -> list[str]:
        return self.start.heads

    @property
    def familiarity(self) -> Familiarity | None:
        return self.start.familiarity

    def bench(self, name: str | None) -> Bench:
        """The chosen model, loaded on first use (None: the one loaded at start)."""
        if not name or name == self.start.name:
            return self.start
        if name not in self.choices:
            raise InputError(f"no model named {name!r}; choose one of {', '.join(self.choices)}")
        with self._load_lock:
            if name not in self.benches:
                path = self.choices[name]
                self.benches[name] = Bench.of(name, MultimodalModel.from_pretrained(path), path)
            return self.benches[name]

    def choose(self, name: str):
        """Model picker -> (the session's choice, model line, layer choices, ablation choices, token choices,
        a cleared last result). Loads the checkpoint the first time it is chosen."""
        try:
            b = self.bench(name)
        except InputError as e:
            raise _error(e) from None
        cfg, mean = b.model.cfg, mean_label(b.model.cfg.query)
        return (b.name, b.info, gr.Radio(choices=[(f"layer {l}", l) for l in range(cfg.layers)], value=0),
                gr.CheckboxGroup(choices=b.heads, value=[]), gr.Dropdown(choices=[mean], value=mean), None)

    # -- the model run ------------------------------------------------------------------

    def infer(self, inputs: Inputs, off: torch.Tensor | None, bench: Bench | None = None):
        return inference.run((bench or self.start).model, inputs, head_mask=off, tokenizer_lock=self._tokenizer_lock)

    def tokens_notice(self, text: str, model: MultimodalModel) -> str | None:
        enc = model.encoders["text"] if "text" in model.encoders else None
        if enc is None:
            return None
        with self._tokenizer_lock:
            n = len(enc.tokenizer(text, truncation=False)["input_ids"])
        if n > enc.max_length:
            return f"the caption has {n} tokens; the text encoder reads the first {enc.max_length}"
        return None

    # -- drawing ------------------------------------------------------------------------

    def draw(self, res: Result, query: int | None, out: Path | None = None) -> list[Path]:
        """Every layer's grids for one query choice (cached per session), + the raw maps."""
        files = res.files.get(query)
        if files and all(p.exists() for p in files):
            return files
        out = out or self.outputs.new()
        files = write_all(res.maps, out, image=res.image, audio=res.audio, query=query)
        if res.maps.query_source == "text" and "text" not in res.maps.segments:
            files += draw_concentration(res.maps, out)
        for p in res.extra_files:
            if p.exists() and p.parent != out:
                shutil.copy(p, out / p.name)
                files.append(out / p.name)
        files += [p for p in res.extra_files if p.parent == out]
        files.append(bundle(out / "maps.zip", files))
        res.files[query] = files
        return files

    def layer_outputs(self, res: Result, files: list[Path], layer: int) -> tuple:
        """(image grid, audio grid, text grid, text highlight HTML, downloads) for one layer."""
        by_name = {p.name: p for p in files}

        def image_update(name: str):
            p = by_name.get(name)
            return gr.Image(value=str(p) if p else None, visible=p is not None)

        if f"layer{layer}_text_concentration.png" in by_name:
            text_grid = image_update(f"layer{layer}_text_concentration.png")
            html_path = by_name.get(f"layer{layer}_text_concentration.html")
            note = TEXT_CONCENTRATION_NOTE
        else:
            text_grid = image_update(f"layer{layer}_text.png")
            html_path = by_name.get(f"layer{layer}_text.html")
            note = TEXT_ATTENTION_NOTE
        markup = f'<p class="mm-note">{note}</p>' + html_path.read_text() if html_path else ""
        downloads = [str(p) for p in files if p.suffix == ".zip"]
        return (image_update(f"layer{layer}_image.png"), image_update(f"layer{layer}_audio.png"), text_grid,
                gr.HTML(value=markup, visible=bool(markup)), downloads)

    # -- handlers -----------------------------------------------------------------------

    def run(self, image=None, audio=None, text=None, ground_truth=None, ablate=None, layer=0, token=None,
            model_name=None):
        """Inputs -> status, score, grids of `layer`, audio playback, metrics, downloads, token choices, session.
        `model_name`: the session's chosen model (None: the one loaded at start)."""
        t0 = time.perf_counter()
        try:
            bench = self.bench(model_name)
            model = bench.model
            inputs = load_inputs(image, audio, text, APP_LIMITS)
            cfg = model.cfg
            notices = inference.input_notices(model, inputs)
            off = head_mask_from(ablate, cfg.layers, cfg.heads)
            search = [self.examples_dir] if self.examples_dir else []
            gt = load_ground_truth(ground_truth, search) if ground_truth else None
            if inputs.text is not None and "text" in model.encoders:
                note = self.tokens_notice(inputs.text, model)
                notices += [note] if note else []
            out = self.infer(inputs, off, bench)
            if bench.familiarity is not None:
                notices += bench.familiarity.notices({m: t for m, t in out.tokens.items() if m in inputs.given},
                                                     image=inputs.image)
            maps = out.maps
            queries = query_labels(maps)
            try:
                query = parse_query(token, [i for i, _ in queries])
            except InputError:
                query = None  # the caption changed since the token was picked
            if gt is not None and gt.caption and inputs.text and not _same_caption(gt.caption, inputs.text):
                notices.append("the ground truth was written for another caption, so pointing/energy are left out")
                gt = None
            if gt is not None and cfg.query != "text":
                notices.append("pointing/energy need text-token queries; this model's queries are "
                               f"{cfg.query}, so they are left out")
                gt = None
            size = (inputs.image.height, inputs.image.width) if inputs.image is not None else None
            headers, rows = metrics_rows(maps, off, gt, size)
            layer = int(layer) if layer is not None and int(layer) in maps.layers else maps.layers[0]
        except InputError as e:
            raise _error(e, (image, audio, ground_truth)) from None
        except gr.Error:
            raise
        except Exception as e:  # a bug or an input nobody foresaw: say so, keep serving
            log.exception("run failed")
            raise _error(f"the model could not run on these inputs ({type(e).__name__}: {e}). The server is "
                         "still up: try other inputs.", (image, audio, ground_truth)) from None

        score = float(torch.sigmoid(out.score[0]))
        thumb = None
        if inputs.image is not None:
            thumb = inputs.image.copy()
            thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
        base = self.outputs.new()
        extra = [write_table(base / "metrics.csv", headers, rows),
                 write_summary(base / "summary.json", bench, inputs, score, ablate, notices)]
        res = Result(maps, thumb, inputs.audio, queries, base, {}, extra, inputs, bench.name, gt)
        files = self.draw(res, query, base)
        playback = None
        if inputs.audio is not None:
            playback = str(base / "audio.wav")
            sf.write(playback, inputs.audio.waveform, inputs.audio.sample_rate, subtype="PCM_16")

        took = time.perf_counter() - t0
        given = ", ".join(describe_input(inputs, m) for m in inputs.given)
        status = f"Ran on {given} in {took:.2f} s."
        if off is not None:
            status += f" Heads switched off: {', '.join(ablate)}."
        order = inference.describe_event_order(inference.event_order(model, out, off))
        if order:
            status += "\n\n" + html.escape(order, quote=False)
        if notices:
            status += "\n\n" + "\n".join(f"- **Note:** {html.escape(n, quote=False)}" for n in notices)
        labels = [mean_label(maps.query_source)] + [lab for _, lab in queries]
        chosen = next((lab for i, lab in queries if i == query), labels[0])
        grids = self.layer_outputs(res, files, layer)
        return (status, {"match": score, "no match": 1.0 - score}, *grids[:3],
                gr.Audio(value=playback, visible=playback is not None), grids[3],
                pd.DataFrame(rows, columns=headers), grids[4],
                gr.Dropdown(choices=labels, value=chosen), res)

    def view(self, res: Result | None, layer=0, token=None):
        """Redraw the last result for another layer / query token (no model run)."""
        if res is None:
            raise gr.Error("run the model first (press Run)", print_exception=False)
        try:
            query = parse_query(token, [i for i, _ in res.queries])
            layer = int(layer)
            if layer not in res.maps.layers:
                raise InputError(f"layer {layer} does not exist; this model has layers {res.maps.layers}")
        except (InputError, ValueError, TypeError) as e:
            raise _error(e) from None
        files = self.draw(res, query)
        return self.layer_outputs(res, files, layer)

    def encoders(self, res: Result | None, source: str = "cls"):
        """The encoders' own heads on the last inputs: (gallery of grids, note). Every captured layer's
        self-attention per head and the attention rollout through the encoder, from the CLS token
        or the mean over the content tokens."""
        if res is None or res.inputs is None:
            raise gr.Error("run the model first (press Run), then draw its encoders", print_exception=False)
        try:
            out = inference.run(self.bench(res.model_name).model, res.inputs, request=False,
                                tokenizer_lock=self._tokenizer_lock, capture_attention=True)
            folder = self.outputs.new()
            files = write_encoder_maps(out.tokens, folder, image=res.image, audio=res.audio, source=source)
        except InputError as e:
            raise _error(e) from None
        without = [m for m in out.tokens if not out.tokens[m].self_attention]
        note = ("Each encoder's self-attention per layer and head (then the head mean), and the attention "
                "rollout through the encoder (Abnar & Zuidema 2020), "
                + ("from its CLS token." if source == "cls" else "as the mean over its content tokens.")
                + " The audio encoder's is its first window's.")
        if without:
            note += (f" The {' and '.join(without)} encoder{'s have' if len(without) > 1 else ' has'} no "
                     "self-attention layers (local tokens): nothing to draw.")
        captions = [p.stem.replace("encoder_", "").replace("_", " ") for p in files]
        return [(str(p), c) for p, c in zip(files, captions)], note

    def relevance(self, res: Result | None, token=None):
        """Gradient-weighted relevance (Chefer et al. 2021) and the rollout through the fusion layers beside
        the raw heads of every layer, on the last inputs: (gallery of grids, table, note). Each grid: every
        head, their mean, the layer's relevance and the rollout up to it, one colour scale. With ground
        truth the table scores heads, relevance and rollout alike."""
        if res is None or res.inputs is None:
            raise gr.Error("run the model first (press Run), then compute relevance", print_exception=False)
        try:
            query = parse_query(token, [i for i, _ in res.queries])
            out, rel = inference.run_with_relevance(self.bench(res.model_name).model, res.inputs,
                                                    self._tokenizer_lock)
        except InputError as e:
            raise _error(e) from None
        maps = out.maps
        extras = {RELEVANCE_LABEL: rel, ROLLOUT_LABEL: fusion_rollout(maps)}
        folder = self.outputs.new()
        items = []
        for layer in maps.layers:
            for r in render_layer(maps, layer, image=res.image, audio=res.audio, query=query, extras=extras):
                path = save_png(r.image, folder / f"relevance_layer{layer}_{r.modality}.png")
                items.append((str(path), f"layer {layer}, {r.modality}"))
        headers, rows = ["panel"], []
        if res.truth is not None and res.inputs is not None:
            image = res.inputs.image
            size = (image.height, image.width) if image is not None else None
            for layer in maps.layers:
                panels = [(maps, [f"L{layer} H{h}" for h in maps.heads[layer]])]
                panels += [(m, [f"L{layer} {label}"]) for label, m in extras.items()]
                for m, labels in panels:
                    scores = grounding_scores(m, layer, res.truth, size)
                    headers = ["panel"] + list(scores)
                    rows += [[label] + [_round(v[i]) for v in scores.values()] for i, label in enumerate(labels)]
        note = ("Each grid: every head of the layer, their mean, then **grad x attn**: the layer's gradient-weighted "
                "relevance (Chefer et al. 2021; the attention weights times the match score's gradient, negative "
                "parts dropped, averaged over heads), and **rollout**: the head means of the fusion layers up to "
                "this one, averaged (Chefer's rule for this block without gradients), on the same colour scale. "
                "No head is switched off here."
                + (" With the ground truth of the last run, the table scores every head, the relevance and the "
                   "rollout by the same per-phrase definition." if rows else ""))
        return items, pd.DataFrame(rows, columns=headers) if rows else pd.DataFrame(), note

    def study(self, name: str | None):
        """A committed study's report: (report markdown, gallery of its plots and per-run head heatmaps)."""
        reports = study_reports()
        if not name or name not in reports:
            raise gr.Error(f"no committed study named {name!r}; choose one of {', '.join(reports)}",
                           print_exception=False)
        folder = reports[name]
        text = (folder / "report.md").read_text(encoding="utf-8")
        text = re.sub(r"!\[[^\]]*\]\([^)]*\)", "(plot: in the gallery below)", text)  # images are shown below
        out = self.outputs.new()  # gradio serves copies from its own folders
        items = []
        for png in sorted((folder / "plots").glob("*.png")) + sorted((folder / "plots" / "heads").glob("*.png")):
            copy = out / ("heads-" + png.name if png.parent.name == "heads" else png.name)
            shutil.copy(png, copy)
            items.append((str(copy), f"per-head heatmaps: {png.stem}" if png.parent.name == "heads" else png.stem))
        return text, items

    def tokens(self, text: str | None, model_name: str | None = None):
        """Caption -> query-token choices for the dropdown (text-query models)."""
        model = self.bench(model_name).model
        label = mean_label(model.cfg.query)
        enc = model.encoders["text"] if "text" in model.encoders else None
        if model.cfg.query != "text" or enc is None or not text or not str(text).strip():
            return gr.Dropdown(choices=[label], value=label)
        try:
            with self._tokenizer_lock:
                batch = enc.preprocess([str(text)[:MAX_TEXT_CHARS]])
        except InputError:
            return gr.Dropdown(choices=[label], value=label)
        geom, keep = batch["geometry"], ~batch["special"][0]
        toks = [f"{i}: {t}" for i, t in enumerate(geom.tokens[0]) if t and bool(keep[i])]
        return gr.Dropdown(choices=[label] + toks, value=label)


def study_reports() -> dict[str, Path]:
    """name -> report folder of every committed study (multimodal/studies/reports/<name>/report.md)."""
    from multimodal.compare.study import STUDY_DIR

    root = STUDY_DIR / "reports"
    return {d.name: d for d in sorted(root.iterdir()) if (d / "report.md").is_file()} if root.is_dir() else {}


def describe_input(inputs: Inputs, m: str) -> str:
    if m == "image":
        return f"an image of {inputs.image.width}x{inputs.image.height}"
    if m == "audio":
        return f"{inputs.audio.duration:.1f} s of audio"
    return f"a caption of {len(inputs.text)} characters"


def draw_concentration(maps: AttentionMaps, out: Path) -> list[Path]:
    """Text-query models: per layer, each head's concentration per query token as a text grid + HTML.

    Drawn like `text_head_grid` (one row per head, then the mean, one scale) with a legend
    that names what the colour means here.
    """
    geom: TextGeometry = maps.query_geometry
    keep = maps.content_queries()[0].numpy() & np.array([bool(t) for t in geom.tokens[0]])
    tokens = [t for t, k in zip(geom.tokens[0], keep) if k]
    written = []
    for layer in maps.layers:
        c = concentration(maps, layer)[:, keep]  # (h, n)
        rows = np.concatenate([c, c.mean(0, keepdims=True)])  # (h+1, n)
        panels, _ = text_panels(tokens, rows)
        vmin, vmax = value_range(rows)
        legend = colorbar(max(panels[0].height, 120), vmin, vmax, label="concentration\n(1 - normalised\nentropy)")
        labels = [f"L{layer} H{h}" for h in maps.heads[layer]] + ["mean"]
        title = f"text: layer {layer}, concentration per query token"
        path = out / f"layer{layer}_text_concentration.png"
        save_png(grid(panels, labels, 1, title, legend), path)
        path.with_suffix(".html").write_text(text_html(tokens, rows[-1], vmin=vmin, vmax=vmax))  # same scale
        written += [path, path.with_suffix(".html")]
    return written


def bundle(path: Path, files: list[Path]) -> Path:
    """One zip of the request's downloads (PNGs and .npz are compressed already: stored as they are)."""
    with zipfile.ZipFile(path, "w") as z:
        for p in files:
            z.write(p, p.name, zipfile.ZIP_STORED if p.suffix in (".png", ".npz") else zipfile.ZIP_DEFLATED)
    return path


def write_table(path: Path, headers: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(headers)
        w.writerows(rows)
    return path


def write_summary(path: Path, bench: Bench, inputs: Inputs, score: float, ablate, notices) -> Path:
    path.write_text(json.dumps({
        "model": str(bench.source) if bench.source else "random-init (encoder specs)",
        "match_probability": score, "heads_off": list(ablate or []), "notices": notices,
        "inputs": {"image_size": [inputs.image.height, inputs.image.width] if inputs.image else None,
                   "audio_seconds": inputs.audio.duration if inputs.audio else None, "text": inputs.text},
    }, indent=1))
    return path

