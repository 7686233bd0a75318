"""The one inference service under `multimodal maps` and the app.

Where the embedded default model and the bundled samples live, how a model is chosen and
described, how raw inputs become validated `Inputs` (under explicit limits), and one model run
over them. Both faces call these functions, so the command line and the page read inputs,
pick models and run them the same way.

The bundled files (`DEFAULT_CHECKPOINT`, the sample scenes) are package data: in an installed
wheel they sit in `multimodal/assets/`; in a checkout (an editable install) they are the
repository's `assets/` folder, which the wheel's `multimodal/assets/` is built from.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from multimodal import io as mio
from multimodal.analysis.relevance import relevance_maps
from multimodal.data.scenes import caption_words
from multimodal.encoders.registry import describe_spec
from multimodal.encoders.audio import WINDOW_SECONDS
from multimodal.fusion import FusionConfig, FusionOutput, MapRequest
from multimodal.model import ModelOutput, MultimodalModel, is_checkpoint
from multimodal.types import AttentionMaps, InputError


def _assets_dir() -> Path:
    """`multimodal/assets/` in a wheel, else the checkout's `assets/` (editable install)."""
    packaged = Path(__file__).resolve().parent / "assets"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "assets"


ASSETS = _assets_dir()
DEFAULT_CHECKPOINT = ASSETS / "default"  # the embedded default model (`train --preset default`)
EMBEDDED = {"default": DEFAULT_CHECKPOINT, "local": ASSETS / "local"}  # bundled checkpoints, loaded by name
SAMPLE = {"image": ASSETS / "sample.png", "audio": ASSETS / "sample.wav", "text": ASSETS / "sample.txt"}
MIN_AUDIO_SECONDS = WINDOW_SECONDS  # shorter clips are refused: not one filterbank frame of sound
SILENCE_PEAK = 1e-4  # |sample| below this everywhere (-80 dBFS) counts as a silent clip
RANDOM_WEIGHTS_NOTE = ("no trained checkpoint named and none embedded; using encoder specs with RANDOM weights, "
                       "so the maps show structure, not meaning")


def asset_path(name: str) -> Path:
    """A bundled file by name (e.g. "sample.png"), wherever the package is installed."""
    path = ASSETS / name
    if not path.exists():
        raise InputError(f"the bundled file {name} is not in {ASSETS}; reinstall the package")
    return path


# ---------------------------------------------------------------------------------------
# Inputs: validated once, here, under a face's limits
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one face accepts. Clips longer than `max_audio_seconds` are cut, with a notice."""

    max_audio_seconds: float = mio.MAX_AUDIO_SECONDS
    max_text_chars: int = mio.MAX_TEXT_CHARS
    who: str = "the"  # names the limit in messages: "the demo's limit"


@dataclass
class Inputs:
    image: Image.Image | None = None  # RGB, as given
    audio: mio.AudioClip | None = None  # mono, at most the limit
    text: str | None = None
    notices: list[str] = field(default_factory=list)

    @property
    def given(self) -> list[str]:
        return [m for m, v in (("text", self.text), ("image", self.image), ("audio", self.audio)) if v is not None]


def is_silent(clip: mio.AudioClip) -> bool:
    return float(np.abs(clip.waveform).max(initial=0.0)) < SILENCE_PEAK


def load_inputs(image: Any = None, audio: Any = None, text: str | None = None, limits: Limits = Limits()) -> Inputs:
    """Raw image / audio / caption (paths, bytes, arrays, PIL) -> validated inputs and the notices
    a user must see (audio cut, silent clip). Raises InputError with a sentence that says what to do."""
    out = Inputs()
    if image is not None:
        out.image = mio.load_image(image)
    if audio is not None:
        out.audio = mio.load_audio(audio, truncate=True, max_seconds=limits.max_audio_seconds, limit_name=limits.who)
        if out.audio.duration < MIN_AUDIO_SECONDS:
            raise InputError(f"the audio clip is {out.audio.duration * 1000:.2f} ms long, shorter than the audio "
                             f"encoder's smallest window ({MIN_AUDIO_SECONDS * 1000:.0f} ms): give a longer clip")
        if out.audio.notice:
            out.notices.append(out.audio.notice)
        if is_silent(out.audio):
            out.notices.append("the audio clip is silent (no sample above -80 dBFS): the maps over it are not "
                               "meaningful")
    if text is not None and str(text).strip():
        out.text = mio.check_text(str(text), max_chars=limits.max_text_chars, limit_name=limits.who)
    return out


def check_subset(query: str, model_modalities: Sequence[str], given: Sequence[str]) -> list[str]:
    """Raise InputError when the given inputs cannot run this model; return notices for ignored ones."""
    notices = [f"this model has no {m} encoder, so the {m} input was ignored" for m in given
               if m not in model_modalities]
    usable = [m for m in given if m in model_modalities]
    have = " and ".join(model_modalities)
    if query == "latents":
        if not usable:
            raise InputError(f"give at least one input this model reads ({have})")
        return notices
    others = [m for m in model_modalities if m != query]
    names = {"text": "a caption", "image": "an image", "audio": "an audio clip"}
    others_text = " or ".join(names[m] for m in others) or "another input"
    what = "a caption" if query == "text" else f"the {query}"
    if query not in usable:
        raise InputError(f"this model asks with {query} tokens (they attend over the other inputs): give {what} "
                         f"as well as {others_text}")
    if not any(m != query for m in usable):
        raise InputError(f"the {query} tokens need something to attend to: add {others_text} to {what}")
    return notices


# ---------------------------------------------------------------------------------------
# Models: chosen and described one way
# ---------------------------------------------------------------------------------------


def embedded_models() -> dict[str, Path]:
    """name -> folder of each bundled checkpoint this installation has (`EMBEDDED`)."""
    return {name: path for name, path in EMBEDDED.items() if is_checkpoint(path)}


def checkpoint_dir(model: str | Path) -> Path:
    """`--model`'s value -> a checkpoint folder: a folder that exists, else an embedded model's name."""
    path = Path(model).expanduser()
    if path.exists() or str(model) not in EMBEDDED:
        return path
    found = embedded_models()
    if str(model) not in found:
        raise InputError(f"the embedded model {str(model)!r} is not in this installation ({ASSETS}); embedded: "
                         f"{', '.join(found) or 'none'}")
    return found[str(model)]


def load_model(model_dir: str | Path | None = None, specs: dict[str, str | None] | None = None,
               device: str = "cpu", fusion: dict | None = None) -> tuple[MultimodalModel, Path | None]:
    """(model, source): a checkpoint, else the embedded default when no encoder specs are named,
    else a model built from the specs with RANDOM weights (source None)."""
    device = check_device(device)
    if model_dir:
        path = checkpoint_dir(model_dir)
        return MultimodalModel.from_pretrained(path, map_location=device).eval(), path
    specs = {m: s for m, s in (specs or {}).items() if s}
    if not specs and (DEFAULT_CHECKPOINT / "config.json").is_file():
        return MultimodalModel.from_pretrained(DEFAULT_CHECKPOINT, map_location=device).eval(), DEFAULT_CHECKPOINT
    cfg = FusionConfig(**(fusion or {}))
    return MultimodalModel.from_specs(fusion=cfg, **specs).to(device).eval(), None


def check_device(device: str) -> str:
    """A device this machine has, or an InputError that says what to use instead."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r} ({e}); use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU is visible on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def known_words(model: MultimodalModel) -> list[str] | None:
    """The words of every caption the model was trained on (recorded at training), or None when
    unknown (a hub or random model). Checkpoints trained on scenes before the words were recorded
    know the scenes' caption words."""
    if "caption_words" in model.meta:
        return list(model.meta["caption_words"])
    return caption_words() if model.trained_on_scenes else None


def vocabulary_notice(model: MultimodalModel, text: str | None) -> str | None:
    """A notice naming the caption's words the model never saw in training, and its vocabulary."""
    known = known_words(model)
    if not known or not text:
        return None
    new = [w for w in dict.fromkeys(mio.text_words(text)) if w not in set(known)]
    if not new:
        return None
    shown = ", ".join(f"'{w}'" for w in new[:12]) + (f" and {len(new) - 12} more" if len(new) > 12 else "")
    vocabulary = " ".join(known) if len(known) <= 60 else " ".join(known[:60]) + f" ... ({len(known)} words)"
    return (f"{len(new)} word{'s' if len(new) != 1 else ''} of the caption {'are' if len(new) != 1 else 'is'} new to "
            f"this model: {shown}. It was trained on captions of {len(known)} words only, so it reads a new word "
            f"as pieces it never learned to ground: those maps and the match score mean little. Its words: "
            f"{vocabulary}")


def input_notices(model: MultimodalModel, inputs: Inputs) -> list[str]:
    """Everything a face says about inputs the model can run on: the inputs' own notices (audio cut,
    silent clip), inputs this model ignores, and caption words it never saw. Raises InputError when
    the inputs cannot run this model (`check_subset`)."""
    notices = inputs.notices + check_subset(model.cfg.query, model.modalities, inputs.given)
    if "text" in model.encoders:
        notices += [n for n in [vocabulary_notice(model, inputs.text)] if n]
    return notices


def encoders_in_words(model: MultimodalModel) -> str:
    """Each encoder's spec and what it is, e.g. "image `vit-local-scenes`: local tokens: ..."."""
    parts = []
    for m in model.modalities:
        spec = getattr(model.encoders[m], "spec", "?")
        parts.append(f"{m} `{spec}`: {describe_spec(m, spec)}")
    return "; ".join(parts)


def describe_model(model: MultimodalModel, source: str | Path | None) -> str:
    """Markdown: which model is loaded (named by its folder, not the server's path), its encoders in
    words, and a warning when its weights are random or untrained."""
    cfg = model.cfg
    q = "text-token queries" if cfg.query == "text" else (
        f"{cfg.num_latents} learned latent queries" if cfg.query == "latents" else f"{cfg.query}-token queries")
    fusion = (f"fusion {cfg.layers} layer{'s' if cfg.layers != 1 else ''} x {cfg.heads} heads, {cfg.attention} "
              f"attention, {q}" + (", queries compete for keys" if cfg.compete else ""))
    step = model.meta.get("step")
    if source is None:
        return (f"**Model:** built from encoder specs with **random weights** ({fusion}). No trained checkpoint "
                f"was named and none is embedded: the maps show structure, not meaning, "
                f"and the match score is meaningless. Encoders: {encoders_in_words(model)}.")
    embedded = {p.resolve(): name for name, p in EMBEDDED.items()}
    name = embedded.get(Path(source).resolve())
    where = ("the embedded default" if name == "default" else f"the embedded model `{name}`" if name
             else f"checkpoint `{Path(source).name}`")
    trained = (f"trained for {step} steps" if step is not None else
               "**no training record in its config: if it was never trained, its maps and score are meaningless**")
    return f"**Model:** {where}, {fusion}; {trained}. Encoders: {encoders_in_words(model)}."


# ---------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------


def run(model: MultimodalModel, inputs: Inputs, head_mask: torch.Tensor | None = None,
        request: MapRequest | bool = True, tokenizer_lock: threading.Lock | None = None,
        capture_attention: bool | Sequence[str] = False) -> FusionOutput:
    """One forward pass over the inputs the model reads (others are ignored; see check_subset).

    `request` says which maps to return (MapRequest, True for all); `tokenizer_lock` serialises
    the tokenizer when several threads share the model (HF fast tokenizers are not thread-safe);
    `capture_attention` (True, or modalities) keeps those encoders' own self-attention in the
    output's tokens (`out.tokens[m].self_attention`).
    """
    with torch.inference_mode():
        tokens = model.encode(_batches(model, inputs, tokenizer_lock), capture_attention)
        return model.fuse(tokens, head_mask=head_mask, return_maps=request)


def _batches(model: MultimodalModel, inputs: Inputs, tokenizer_lock: threading.Lock | None = None) -> dict:
    """The encoder batches of the inputs the model reads."""
    batches = {}
    if inputs.text is not None and "text" in model.encoders:
        with tokenizer_lock or nullcontext():
            batches.update(model.preprocess(text=[inputs.text]))
    raw = {m: [getattr(inputs, m)] for m in ("image", "audio") if getattr(inputs, m) is not None and m in model.encoders}
    if raw:
        batches.update(model.preprocess(**raw))
    return batches


def run_with_relevance(model: MultimodalModel, inputs: Inputs, tokenizer_lock: threading.Lock | None = None,
                       capture_attention: bool | Sequence[str] = False) -> tuple[ModelOutput, AttentionMaps]:
    """`run` with every head's maps, and the gradient-weighted relevance of the same forward pass
    (one pseudo-head per layer, `analysis.relevance.relevance_maps`): one forward with grad and one
    backward. The output comes back detached, as `run`'s would."""
    with torch.enable_grad():
        out = model.fuse(model.encode(_batches(model, inputs, tokenizer_lock), capture_attention), return_maps=True)
        rel = relevance_maps(out.score, out.maps)
    maps = out.maps
    maps.weights = {l: w.detach() for l, w in maps.weights.items()}
    maps.claimed = None if maps.claimed is None else {l: c.detach() for l, c in maps.claimed.items()}
    out.score = out.score.detach()
    for t in out.tokens.values():
        t.self_attention = None if t.self_attention is None else [a.detach() for a in t.self_attention]
    return out, rel


def event_order(model: MultimodalModel, out, head_mask: torch.Tensor | None = None) -> list[dict]:
    """What a model that reads event order (`match_order`) read for each "<phrase> then <phrase>" of the
    first caption in `out` (a `run` output with every layer's and head's maps): the two phrases, the times
    (s) their audio attention is centred on, and the term the pair adds to the match's soft minimum
    (negative: out of order). Empty for other models, captions without "then" or maps without audio."""
    maps = out.maps
    if (not model.match_order or maps is None or "audio" not in maps.segments
            or "text" not in out.tokens or any(len(maps.heads[l]) != maps.num_heads for l in maps.layers)
            or len(maps.layers) != model.cfg.layers):
        return []
    text = out.tokens["text"]
    with torch.no_grad():  # one reading: the pairs, their times and their terms, as the score took them
        before, after, t_before, t_after, terms = model.read_order(text, maps, head_mask)
    caption, spans = text.geometry.texts[0], text.geometry.spans[0]

    def words(weights: torch.Tensor) -> str:
        idx = weights.nonzero().flatten().tolist()
        return caption[spans[idx[0]][0]:spans[idx[-1]][1]]

    pairs = []
    for p in range(before.shape[1]):
        if before[0, p].sum() == 0:
            break
        pairs.append({"first": words(before[0, p]), "first_s": float(t_before[0, p]), "then": words(after[0, p]),
                      "then_s": float(t_after[0, p]), "term": float(terms[0, p])})
    return pairs


SAME_TIME_S = 0.25  # two phrases centred closer than this: their order is not read (e.g. "a chirp then a chirp")


def describe_event_order(pairs: list[dict]) -> str | None:
    """One line per pair of `event_order`, for people."""
    if not pairs:
        return None
    def verdict(p: dict) -> str:
        if abs(p["then_s"] - p["first_s"]) < SAME_TIME_S:
            return (f"within {SAME_TIME_S:g} s of each other, so the maps hardly tell them apart in time (a repeated "
                    "event reads so too)")
        return "in order" if p["term"] > 0 else "out of order, which alone makes this caption no match"

    lines = [f"'{p['first']}' centred at {p['first_s']:.2f} s, then '{p['then']}' at {p['then_s']:.2f} s: "
             f"{verdict(p)} (term {p['term']:+.2f})" for p in pairs]
    return "Event order, read off the audio maps: " + "; ".join(lines) + "."

