"""Typed data that flows through the sandbox: tokens with their geometry, and attention maps.

Geometry travels with the tokens (docs/design.md): the encoder that made the tokens knows the
patch grid, the frame times and the character spans, and nothing downstream re-derives them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor

from multimodal.errors import InputError  # noqa: F401  (raised here; imported from here by the rest)

MODALITIES = ("text", "image", "audio")


def loose_switch(config) -> str | None:
    """The first bool field of dataclass `config` holding something else, or None. `--set calibrate=False`
    is the string "False" (TOML writes false), which is truthy: a config refuses it by this field's name."""
    for f in fields(config):
        if f.type == "bool" and not isinstance(getattr(config, f.name), bool):
            return f.name
    return None


# ---------------------------------------------------------------------------------------
# Geometry: what a renderer needs to draw a map over the input.
# ---------------------------------------------------------------------------------------


@dataclass
class TextGeometry:
    """Per item: the input string, its token strings and each token's character span.

    Lists are per batch item and each has length N (the padded token count); padding
    tokens have the string "" and span (0, 0).
    """

    texts: list[str]
    tokens: list[list[str]]
    spans: list[list[tuple[int, int]]]

    kind = "text"


@dataclass
class ImageGeometry:
    """Token layout of a ViT: `num_prefix` special tokens, then a row-major (gh, gw) grid."""

    grid: tuple[int, int]  # (gh, gw) patches
    image_size: tuple[int, int]  # (H, W) pixels of the model input
    patch_size: tuple[int, int]  # (ph, pw) pixels
    num_prefix: int = 0  # CLS / register tokens before the patch tokens
    original_sizes: list[tuple[int, int]] = field(default_factory=list)  # per item (H, W) as uploaded

    kind = "image"


@dataclass
class AudioGeometry:
    """Token layout of an audio transformer: `num_prefix` specials, then time-major patches.

    Token `num_prefix + t * freq_bins + f` covers time column `t` (centre `times[t]` in
    seconds) and frequency band `f`. `durations` holds each item's real length in seconds;
    columns past it are padding (their tokens are False in the mask).
    """

    times: list[float]  # centre of each time column, seconds
    freq_bins: int  # patches along frequency per time column
    sample_rate: int
    durations: list[float]  # per item, seconds
    hop_seconds: float = 0.01  # one feature frame
    num_prefix: int = 0

    kind = "audio"


Geometry = Union[TextGeometry, ImageGeometry, AudioGeometry]
_GEOMETRY_TYPES = {"text": TextGeometry, "image": ImageGeometry, "audio": AudioGeometry}


def geometry_to_dict(geom: Geometry | None) -> dict | None:
    if geom is None:
        return None
    return {"kind": geom.kind, **asdict(geom)}


def geometry_from_dict(d: dict | None) -> Geometry | None:
    if d is None:
        return None
    d = dict(d)
    cls = _GEOMETRY_TYPES[d.pop("kind")]
    for key in ("grid", "image_size", "patch_size"):
        if key in d:
            d[key] = tuple(d[key])
    if "original_sizes" in d:
        d["original_sizes"] = [tuple(s) for s in d["original_sizes"]]
    if "spans" in d:
        d["spans"] = [[tuple(s) for s in item] for item in d["spans"]]
    return cls(**d)


# ---------------------------------------------------------------------------------------
# Tokens out of an encoder
# ---------------------------------------------------------------------------------------


@dataclass
class ModalityTokens:
    """One modality's encoder output, ready for the fusion block."""

    tokens: Tensor  # (B, N, D)
    mask: Tensor  # (B, N) bool, True = real token
    modality: str  # "text" | "image" | "audio"
    special: Tensor  # (B, N) bool, True = CLS / SEP / register token (real but not content)
    geometry: Geometry
    self_attention: list[Tensor] | None = None  # per encoder layer (B, h, N_enc, N_enc), only when asked

    def __post_init__(self):
        assert self.modality in MODALITIES, self.modality
        assert self.tokens.dim() == 3, self.tokens.shape
        assert self.mask.shape == self.tokens.shape[:2], (self.mask.shape, self.tokens.shape)
        assert self.special.shape == self.mask.shape
        assert self.mask.dtype == torch.bool and self.special.dtype == torch.bool

    @property
    def dim(self) -> int:
        return self.tokens.shape[-1]

    def to(self, device) -> "ModalityTokens":
        sa = None if self.self_attention is None else [a.to(device) for a in self.self_attention]
        return ModalityTokens(self.tokens.to(device), self.mask.to(device), self.modality,
                              self.special.to(device), self.geometry, sa)

    def select(self, items: slice | list[int]) -> "ModalityTokens":
        """The items `items` (a slice, or their indices in order) of the batch, geometry included."""
        pick = (lambda seq: seq[items]) if isinstance(items, slice) else (lambda seq: [seq[i] for i in items])
        g = self.geometry
        if isinstance(g, TextGeometry):
            g = replace(g, texts=pick(g.texts), tokens=pick(g.tokens), spans=pick(g.spans))
        elif isinstance(g, AudioGeometry):
            g = replace(g, durations=pick(g.durations))
        elif isinstance(g, ImageGeometry) and g.original_sizes:
            g = replace(g, original_sizes=pick(g.original_sizes))
        return ModalityTokens(self.tokens[items], self.mask[items], self.modality, self.special[items], g)

    def repeat(self, n: int) -> "ModalityTokens":
        """Each item n times in a row (B -> B*n), e.g. to score n captions against one scene."""
        return ModalityTokens(self.tokens.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0), self.modality,
                              self.special.repeat_interleave(n, 0), self.geometry)


# ---------------------------------------------------------------------------------------
# Attention maps out of the fusion block
# ---------------------------------------------------------------------------------------


@dataclass
class AttentionMaps:
    """Per-layer cross-attention weights with everything needed to draw and score them.

    `weights[l]` is `(B, h_l, Nq, Nk)` for each layer `l` in `layers`, where `heads[l]`
    lists which of the block's heads those `h_l` rows are. Keys are the concatenation of
    the modalities in `segments` order; `segments[m] = (start, stop)` is modality m's slice.
    """

    weights: dict[int, Tensor]  # layer -> (B, h_l, Nq, Nk)
    heads: dict[int, list[int]]  # layer -> head indices kept
    segments: dict[str, tuple[int, int]]  # modality -> key slice [start, stop)
    key_mask: Tensor  # (B, Nk) bool
    key_special: Tensor  # (B, Nk) bool
    query_source: str  # "latents" or a modality name
    query_mask: Tensor  # (B, Nq) bool
    key_geometry: dict[str, Geometry]
    query_geometry: Geometry | None = None
    num_heads: int = 0  # heads per layer in the block
    query_special: Tensor | None = None  # (B, Nq) bool, CLS/SEP among modality queries
    # competing queries only: layer -> (B, h_l, Nq) each query's share of the valid keys before its row was
    # renormalised (fusion.competitive_attention); a faint query's map looks as peaked as a strong one's
    claimed: dict[int, Tensor] | None = None

    @property
    def layers(self) -> list[int]:
        return sorted(self.weights)

    @property
    def modalities(self) -> list[str]:
        return list(self.segments)

    def content_queries(self) -> Tensor:
        """`(B, Nq)` bool: real queries that name content (text tokens without CLS/SEP; every latent)."""
        if self.query_special is None:
            return self.query_mask
        return self.query_mask & ~self.query_special

    def select(self, request=None) -> "AttentionMaps":
        """Only the layers and heads a `MapRequest` names (None, or a request naming none: all these maps)."""
        layers = self.layers if request is None or request.layers is None else list(request.layers)
        weights, heads, claimed = {}, {}, {}
        for layer in layers:
            self._require(next(iter(self.segments)), layer)
            keep = self.heads[layer] if request is None or request.heads is None else list(request.heads)
            whole = keep == self.heads[layer]  # the same tensors, not copies: gradients reach what the output used
            idx = [self.heads[layer].index(h) for h in keep]
            weights[layer], heads[layer] = self.weights[layer] if whole else self.weights[layer][:, idx], keep
            if self.claimed is not None and layer in self.claimed:
                claimed[layer] = self.claimed[layer] if whole else self.claimed[layer][:, idx]
        return replace(self, weights=weights, heads=heads, claimed=claimed or None)

    def _require(self, modality: str, layer: int) -> None:
        if modality not in self.segments:
            raise InputError(
                f"no {modality} maps: the keys hold {', '.join(self.segments) or 'nothing'}. "
                f"Give a {modality} input to the model (or use latent queries) to get {modality} maps.")
        if layer not in self.weights:
            raise InputError(f"layer {layer} was not requested; these maps hold layers {self.layers}")

    def modality_weights(self, modality: str, layer: int, renormalise: bool = False,
                         drop_special: bool = True) -> Tensor:
        """Weights over one modality's keys: `(B, h, Nq, N_m)`.

        With `renormalise`, each row is divided by its mass inside the modality (rows with
        no mass there stay zero). Special tokens are zeroed first when `drop_special`.
        """
        self._require(modality, layer)
        start, stop = self.segments[modality]
        w = self.weights[layer][..., start:stop]  # (B, h, Nq, N_m)
        if drop_special:
            keep = (self.key_mask & ~self.key_special)[:, start:stop]  # (B, N_m)
            w = w * keep[:, None, None, :].to(w.dtype)
        if renormalise:
            w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        return w

    def modality_share(self, layer: int) -> dict[str, Tensor]:
        """Each modality's share of every row's mass: modality -> `(B, h, Nq)`."""
        return {m: self.weights[layer][..., a:b].sum(-1) for m, (a, b) in self.segments.items()}

    def image_maps(self, layer: int, renormalise: bool = False) -> Tensor:
        """`(B, h, Nq, gh, gw)` weight on each image patch."""
        w = self.modality_weights("image", layer, renormalise)
        geom: ImageGeometry = self.key_geometry["image"]
        gh, gw = geom.grid
        patches = w[..., geom.num_prefix:geom.num_prefix + gh * gw]  # (B, h, Nq, gh*gw)
        return patches.reshape(*patches.shape[:-1], gh, gw)  # (B, h, Nq, gh, gw)

    def audio_maps(self, layer: int, renormalise: bool = False) -> Tensor:
        """`(B, h, Nq, T)` weight on each time column (summed over frequency bands)."""
        w = self.modality_weights("audio", layer, renormalise)
        geom: AudioGeometry = self.key_geometry["audio"]
        T, F = len(geom.times), geom.freq_bins
        patches = w[..., geom.num_prefix:geom.num_prefix + T * F]  # (B, h, Nq, T*F)
        return patches.reshape(*patches.shape[:-1], T, F).sum(-1)  # (B, h, Nq, T)

    def text_maps(self, layer: int, renormalise: bool = False) -> Tensor:
        """`(B, h, Nq, N_text)` weight on each text token (special tokens zeroed)."""
        return self.modality_weights("text", layer, renormalise)

    # -- save / load: one .npz of arrays + one .json of everything else -----------------

    def save(self, path: str | Path) -> tuple[Path, Path]:
        path = Path(path)
        stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
        stem.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"layer{l}": w.detach().float().cpu().numpy() for l, w in self.weights.items()}
        arrays["key_mask"] = self.key_mask.cpu().numpy()
        arrays["key_special"] = self.key_special.cpu().numpy()
        arrays["query_mask"] = self.query_mask.cpu().numpy()
        if self.query_special is not None:
            arrays["query_special"] = self.query_special.cpu().numpy()
        for l, c in (self.claimed or {}).items():
            arrays[f"claimed{l}"] = c.detach().float().cpu().numpy()
        npz, meta = stem.with_suffix(".npz"), stem.with_suffix(".json")
        np.savez_compressed(npz, **arrays)
        meta.write_text(json.dumps({
            "format": "multimodal-attention-maps/1",
            "layers": self.layers,
            "heads": {str(l): h for l, h in self.heads.items()},
            "num_heads": self.num_heads,
            "segments": {m: list(s) for m, s in self.segments.items()},
            "query_source": self.query_source,
            "key_geometry": {m: geometry_to_dict(g) for m, g in self.key_geometry.items()},
            "query_geometry": geometry_to_dict(self.query_geometry),
            "shape_note": "layerL arrays are (B, heads[L], Nq, Nk) float32; claimedL (competing queries only) "
                          "(B, heads[L], Nq): each query's share of the keys before its row was renormalised",
        }, indent=1))
        return npz, meta

    @classmethod
    def load(cls, path: str | Path) -> "AttentionMaps":
        path = Path(path)
        stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
        meta = json.loads(stem.with_suffix(".json").read_text())
        if meta.get("format") != "multimodal-attention-maps/1":
            raise InputError(f"{stem}.json is not a maps file written by this sandbox")
        with np.load(stem.with_suffix(".npz"), allow_pickle=False) as z:
            weights = {int(l): torch.from_numpy(z[f"layer{l}"]) for l in meta["layers"]}
            key_mask = torch.from_numpy(z["key_mask"])
            key_special = torch.from_numpy(z["key_special"])
            query_mask = torch.from_numpy(z["query_mask"])
            query_special = torch.from_numpy(z["query_special"]) if "query_special" in z else None
            claimed = {int(l): torch.from_numpy(z[f"claimed{l}"]) for l in meta["layers"] if f"claimed{l}" in z}
        return cls(
            weights=weights,
            heads={int(l): list(h) for l, h in meta["heads"].items()},
            segments={m: tuple(s) for m, s in meta["segments"].items()},
            key_mask=key_mask, key_special=key_special,
            query_source=meta["query_source"], query_mask=query_mask,
            key_geometry={m: geometry_from_dict(g) for m, g in meta["key_geometry"].items()},
            query_geometry=geometry_from_dict(meta["query_geometry"]),
            num_heads=meta["num_heads"], query_special=query_special, claimed=claimed or None,
        )
