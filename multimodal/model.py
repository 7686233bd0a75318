"""A whole sandbox model: one encoder per modality, the fusion block, and a caption/scene match head.

Checkpoints are a directory: `config.json` (format version, each encoder's architecture,
the fusion config, training metadata), `model.safetensors` (all weights) and
`tokenizer/` (the text tokenizer). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from multimodal.encoders import build_encoder, encoder_from_config
from multimodal.encoders.text import phrase_member, text_phrase_groups
from multimodal.fusion import CrossAttentionFusion, FusionConfig, FusionOutput, MapRequest
from multimodal.types import MODALITIES, InputError, ModalityTokens

CHECKPOINT_FORMAT = "multimodal-sandbox-checkpoint/1"
# "mean": an MLP scores the pooled query; "softmin": the MLP scores every content query and a soft
# minimum combines them; "bilinear": every content query is scored by how well what it gathered
# (its fused output) agrees with what it asked for (its own input embedding), then a soft minimum.
# "attended": the same, but what a query gathered is only what its cross-attention brought in (summed over
# layers, no residual copy of the query): a query scores well only by attending where its answer is.
MATCH_POOLS = ("mean", "softmin", "bilinear", "attended")
# which text queries the soft minimum takes: "content" = all but CLS / SEP; "phrases" = only tokens inside a
# phrase, not the joining words ("and", "with", "then"), which name nothing and ask the same in every candidate
MATCH_OVER = ("content", "phrases")
SOFTMIN_TEMPERATURE = 0.5
# match_order: each "<phrase> then <phrase>" in a caption adds one item to the soft minimum, scale * (t2 - t1) +
# bias, where t1 and t2 are the times (seconds) the two phrases' audio attention is centred on: a caption whose
# events are heard in the other order scores no match however well each event is found
ORDER_WORD = "then"
ORDER_SCALE_INIT = 4.0  # logit per second of separation, at the start (softplus of a learned parameter)
ORDER_BIAS_INIT = 2.0
DEFAULT_SPECS = {"text": "bert-tiny-scenes", "image": "vit-tiny-scenes", "audio": "ast-tiny-scenes"}


@dataclass
class ModelOutput:
    score: Tensor  # (B,) caption/scene match logit
    fused: FusionOutput  # queries, pooled, maps
    tokens: dict[str, ModalityTokens] = field(default_factory=dict)

    @property
    def maps(self):
        return self.fused.maps


class MultimodalModel(nn.Module):
    def __init__(self, encoders: Mapping[str, nn.Module], fusion: FusionConfig | Mapping,
                 match: str = "mean", meta: Mapping[str, Any] | None = None, match_over: str = "content",
                 match_order: bool = False):
        super().__init__()
        if not encoders:
            raise InputError("a model needs at least one encoder")
        self.encoders = nn.ModuleDict(dict(encoders))
        cfg = fusion if isinstance(fusion, FusionConfig) else FusionConfig.from_dict(fusion)
        dims = {m: enc.dim for m, enc in self.encoders.items()}
        if dict(cfg.input_dims) != dims:
            cfg = FusionConfig.from_dict({**cfg.to_dict(), "input_dims": dims})
        self.fusion = CrossAttentionFusion(cfg)
        d = cfg.dim
        if match not in MATCH_POOLS:
            raise InputError(f"match={match!r}: use one of {MATCH_POOLS}")
        self.match = match
        if match_over not in MATCH_OVER:
            raise InputError(f"match_over={match_over!r}: use one of {MATCH_OVER}")
        self.match_over = match_over
        self.match_order = False
        self.match_head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        if match in ("bilinear", "attended"):  # <asked(input query), gathered(fused query or attended)> + bias
            self.match_asked = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
            self.match_gathered = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
        self.meta = dict(meta or {})
        if match_order:
            self.enable_match_order()

    def enable_match_order(self) -> None:
        """Switch the order items on (`match_order`), their scale and bias at their initial values."""
        if self.match == "mean" or self.cfg.query != "text":
            raise InputError("match_order needs text queries and a soft-minimum match (match = softmin, "
                             f"bilinear or attended; this model has match = {self.match!r}, query = {self.cfg.query!r})")
        raw = torch.tensor(ORDER_SCALE_INIT).expm1().log()  # softplus(raw) = ORDER_SCALE_INIT
        device = self.match_head[-1].bias.device
        self.order_scale = nn.Parameter(raw.to(device))
        self.order_bias = nn.Parameter(torch.tensor(ORDER_BIAS_INIT, device=device))
        self.match_order = True

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_specs(cls, fusion: FusionConfig | Mapping | None = None, match: str = "mean",
                   match_over: str = "content", match_order: bool = False, encoder_args: Mapping[str, Mapping[str, Any]] | None = None,
                   **specs: str | None) -> "MultimodalModel":
        """Build from encoder specs (built-in name, local directory or hub name) per modality.

        `MultimodalModel.from_specs(text="bert-tiny-scenes", image="vit-tiny-scenes", audio=None)`.
        Modalities left out use the built-in default; `None` leaves that modality out.
        `encoder_args`: modality -> keyword arguments for its encoder's builder (e.g. a built-in's depth).
        """
        unknown = set(specs) - set(MODALITIES)
        if unknown:
            raise InputError(f"unknown modality {sorted(unknown)}; use {MODALITIES}")
        chosen = {**DEFAULT_SPECS, **specs}
        encoders = {m: build_encoder(m, s, **dict((encoder_args or {}).get(m, {}))) for m, s in chosen.items() if s}
        return cls(encoders, fusion or FusionConfig(), match=match, match_over=match_over, match_order=match_order)

    @property
    def cfg(self) -> FusionConfig:
        return self.fusion.cfg

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if m in self.encoders]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def trained_on_scenes(self) -> bool:
        """Its config records a training run on the procedural scenes (not on a manifest's rows)."""
        tc = self.meta.get("train_config")
        return isinstance(tc, dict) and not tc.get("manifest")

    # -- running --------------------------------------------------------------------------

    def preprocess(self, **raw: Sequence | None) -> dict[str, dict]:
        """Raw inputs per modality (lists, one item per batch element) -> encoder batches."""
        batches = {}
        for m, items in raw.items():
            if items is None:
                continue
            if m not in self.encoders:
                raise InputError(f"this model has no {m} encoder (it has {', '.join(self.modalities)})")
            batches[m] = self.encoders[m].preprocess(list(items))
        if not batches:
            raise InputError(f"give at least one input ({', '.join(self.modalities)})")
        return batches

    def encode(self, batches: Mapping[str, dict], capture_attention: bool | Sequence[str] = False
               ) -> dict[str, ModalityTokens]:
        capture = set(MODALITIES) if capture_attention is True else set(capture_attention or ())
        return {m: self.encoders[m](b, capture_attention=m in capture) for m, b in batches.items()}

    def fuse(self, tokens: Mapping[str, ModalityTokens], head_mask: Tensor | None = None,
             return_maps: bool | MapRequest = False) -> ModelOutput:
        order = self.match_order and "audio" in tokens and "text" in tokens
        fused = self.fusion(tokens, head_mask=head_mask, return_maps=MapRequest() if order else return_maps)
        items = None
        if order:  # the order items need every layer's and head's audio weights
            items = self.order_items(tokens["text"], fused.maps, head_mask)
            fused.maps = fused.maps.select(return_maps if isinstance(return_maps, MapRequest) else None) \
                if return_maps else None
        if self.match == "mean":
            score = self.match_head(fused.pooled).squeeze(-1)  # (B,)
        else:  # every content query must find its match: a soft minimum over per-query scores
            if self.match in ("bilinear", "attended"):
                asked = self.match_asked(fused.query_inputs)  # (B, Nq, D)
                gathered = self.match_gathered(fused.queries if self.match == "bilinear" else fused.attended)
                per_query = (asked * gathered).sum(-1) / asked.shape[-1] ** 0.5 + self.match_head[-1].bias
            else:
                per_query = self.match_head(fused.queries).squeeze(-1)  # (B, Nq)
            content = fused.query_mask.clone()
            if "text" in tokens and self.cfg.query == "text":
                content &= ~tokens["text"].special
                if self.match_over == "phrases":  # a caption of joining words only keeps its content tokens
                    member = phrase_member(tokens["text"]).to(content.device) & content
                    content = torch.where(member.any(1, keepdim=True), member, content)
            if items is not None:  # (B, P) order items, NaN where a caption has fewer "then"s
                per_query = torch.cat([per_query, items.nan_to_num(0.0)], 1)
                content = torch.cat([content, ~items.isnan()], 1)
            t = SOFTMIN_TEMPERATURE
            score = -t * torch.logsumexp((-per_query / t).masked_fill(~content, float("-inf")), dim=1)  # (B,)
        return ModelOutput(score=score, fused=fused, tokens=dict(tokens))

    def event_times(self, maps, head_mask: Tensor | None = None) -> Tensor:
        """(B, Nq) the time (seconds) each query's audio attention is centred on: the mean column time
        under its weight on the audio keys, summed over every layer and head (a head that hardly looks
        at the audio hardly counts; one that `head_mask` removes does not count)."""
        w = 0
        for layer in maps.layers:
            a = maps.audio_maps(layer)  # (B, h, Nq, T)
            if head_mask is not None:
                a = a * head_mask[layer, maps.heads[layer]].to(a)[None, :, None, None]
            w = w + a.sum(1)  # (B, Nq, T)
        times = torch.tensor(maps.key_geometry["audio"].times, dtype=w.dtype, device=w.device)
        return (w * times).sum(-1) / w.sum(-1).clamp_min(torch.finfo(w.dtype).tiny)

    def read_order(self, text: ModalityTokens, maps, head_mask: Tensor | None = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Per "<phrase> then <phrase>" in each caption: the phrase before and the phrase after as token
        weights (B, P, Nq) each (`order_pairs`), their times (B, P) each (the mean of their tokens'
        `event_times`), and the items (B, P), softplus(order_scale) * (t_after - t_before) + order_bias, NaN
        past a caption's pairs."""
        before, after = order_pairs(text)  # (B, P, Nq) each, rows of 1 / phrase length
        t = self.event_times(maps, head_mask)  # (B, Nq)
        before, after = before.to(t), after.to(t)
        t_before, t_after = torch.einsum("bpn,bn->bp", before, t), torch.einsum("bpn,bn->bp", after, t)
        # the gap as one einsum over (after - before), not t_after - t_before: equal up to float rounding, and
        # rounding is enough to send training elsewhere; this form is the one assets/default was trained with
        gap = torch.einsum("bpn,bn->bp", after - before, t)
        items = F.softplus(self.order_scale) * gap + self.order_bias
        return before, after, t_before, t_after, items.masked_fill(before.sum(-1) == 0, float("nan"))

    def order_items(self, text: ModalityTokens, maps, head_mask: Tensor | None = None) -> Tensor:
        """(B, P): `read_order`'s items, the terms the soft minimum takes."""
        return self.read_order(text, maps, head_mask)[-1]

    def forward(self, text=None, image=None, audio=None, head_mask: Tensor | None = None,
                return_maps: bool | MapRequest = False, capture_attention: bool | Sequence[str] = False
                ) -> ModelOutput:
        tokens = self.encode(self.preprocess(text=text, image=image, audio=audio), capture_attention)
        return self.fuse(tokens, head_mask, return_maps)

    # -- checkpoints ----------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, extra_meta: Mapping[str, Any] | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "format": CHECKPOINT_FORMAT,
            "encoders": {m: enc.config_dict() for m, enc in self.encoders.items()},
            "fusion": self.cfg.to_dict(),
            "match": self.match,
            "match_over": self.match_over,
            "match_order": self.match_order,
            "meta": {**self.meta, **dict(extra_meta or {})},
        }
        if "text" in self.encoders:
            self.encoders["text"].save_tokenizer(directory / "tokenizer")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": CHECKPOINT_FORMAT})
        (directory / "config.json").write_text(json.dumps(config, indent=1))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "MultimodalModel":
        directory = Path(directory)
        cfg_path, weights = directory / "config.json", directory / "model.safetensors"
        if not is_checkpoint(directory):
            raise InputError(f"{directory} is not a sandbox checkpoint: it needs config.json and "
                             "model.safetensors (train one with `multimodal train`)")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{cfg_path} is not readable JSON ({e}): the checkpoint is damaged; copy it again "
                             "or retrain it with `multimodal train`") from None
        if not isinstance(config, dict):
            raise InputError(f"{cfg_path} must hold a JSON object: the checkpoint is damaged")
        if config.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{directory} was written as checkpoint format {config.get('format')!r}; this "
                             f"version of the sandbox reads {CHECKPOINT_FORMAT!r}. Retrain it with "
                             "`multimodal train` or use the matching sandbox version.")
        lacking = [k for k in ("encoders", "fusion") if not isinstance(config.get(k), dict)]
        if lacking:
            raise InputError(f"{cfg_path} lacks {' and '.join(repr(k) for k in lacking)}: the checkpoint is damaged")
        try:
            encoders = {m: encoder_from_config(m, d, tokenizer_dir=directory / "tokenizer")
                        for m, d in config["encoders"].items()}
        except InputError as e:
            raise InputError(f"checkpoint {directory}: {e}") from None
        try:
            model = cls(encoders, config["fusion"], match=config.get("match", "mean"), meta=config.get("meta"),
                        match_over=config.get("match_over", "content"), match_order=config.get("match_order", False))
        except InputError as e:
            raise InputError(f"{cfg_path}: {e}") from None
        except (TypeError, ValueError, KeyError) as e:
            raise InputError(f"{cfg_path} does not describe a model this version can build ({e}): the "
                             "checkpoint is damaged or from another version") from None
        try:
            state = load_file(str(weights), device=str(map_location))
        except Exception as e:  # safetensors reports truncated and garbage files alike
            raise InputError(f"{weights} could not be read as safetensors ({str(e).splitlines()[0][:200]}): the "
                             "file is damaged or truncated; copy it again or retrain") from None
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # size mismatches
            shapes = "; ".join(line.strip() for line in str(e).splitlines() if "size mismatch" in line)[:300]
            raise InputError(f"{weights} does not match its config.json ({shapes or e}): the checkpoint is "
                             "damaged or from another version") from None
        if missing or unexpected:
            raise InputError(f"{weights} does not match its config.json (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}): the checkpoint is damaged or from another version")
        return model.to(map_location).eval()


def order_pairs(text: ModalityTokens) -> tuple[Tensor, Tensor]:
    """For each ORDER_WORD ("then") between two phrases of a caption, the phrase before and the phrase after
    as token weights: two (B, P, N) tensors (each row 1 / the phrase's length on its tokens; P the most
    pairs in any caption; rows past a caption's pairs are zero)."""
    groups = text_phrase_groups(text)  # (B, N)
    pairs = []
    for b, words in enumerate(text.geometry.tokens):
        g = groups[b].tolist()
        pairs.append([(g[j - 1], g[j + 1]) for j in range(1, len(g) - 1)
                      if words[j] == ORDER_WORD and g[j - 1] >= 0 and g[j + 1] >= 0])
    B, N = groups.shape
    P = max(map(len, pairs), default=0)
    before, after = torch.zeros(B, P, N), torch.zeros(B, P, N)
    for b, row in enumerate(pairs):
        for p, (g1, g2) in enumerate(row):
            for out, g in ((before, g1), (after, g2)):
                member = groups[b] == g
                out[b, p] = member / member.sum()
    return before, after


def is_checkpoint(folder: str | Path) -> bool:
    """The folder holds a sandbox checkpoint's two files (config.json and model.safetensors)."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def score_candidates(model: MultimodalModel, scene_batch: dict, captions: list[str], per_scene: int,
                     return_maps=False, share_scene: bool = True) -> tuple[Tensor, ModelOutput]:
    """Scores of `per_scene` captions against each scene of a preprocessed scene batch (captions
    grouped by scene, in order): `((B, per_scene) scores, the fusion output)`. The scene side is
    encoded, embedded and projected once per scene, whatever the number of captions (the fusion
    block takes `per_scene` query items per key item); the output's tokens are the scene's once and
    the captions' (B * per_scene). `share_scene=False` fuses `per_scene` copies of each scene's
    tokens instead (the same scores up to rounding; kept to measure and check the shared way), as
    a model whose queries are not the captions always does (`candidate_inputs`)."""
    tokens = model.encode(scene_batch)
    tokens["text"] = model.encoders["text"](model.encoders["text"].preprocess(captions))
    out = model.fuse(candidate_inputs(model, tokens, per_scene, share_scene), return_maps=return_maps)
    out.tokens = tokens
    return out.score.view(-1, per_scene), out  # (B, per_scene)


def candidate_inputs(model: MultimodalModel, tokens: Mapping[str, ModalityTokens], per_scene: int,
                     share_scene: bool = True) -> dict[str, ModalityTokens]:
    """Fusion inputs for `per_scene` captions (text, B * per_scene) per scene (the other modalities,
    B): the scene's tokens once when the captions are the queries (the fusion block then projects
    them once), else repeated per caption (a caption among the keys needs a scene of its own)."""
    if share_scene and model.cfg.query == "text":
        return dict(tokens)
    return {m: t if m == "text" else t.repeat(per_scene) for m, t in tokens.items()}
