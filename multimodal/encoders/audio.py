"""Audio encoder: Kaldi fbank features (torchaudio) into a transformers Audio Spectrogram Transformer.

Long clips are cut into consecutive windows of the model's `max_length` frames (the last one
padded), each window runs through the model on its own (memory linear in clip length), and
the patch tokens of all windows are concatenated along time. Tokens are time-major: token
`t * freq_bins + f` is time column `t`, frequency band `f`; AST's CLS/distillation tokens
are dropped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchaudio
from torch import Tensor, nn
from transformers import ASTConfig, ASTFeatureExtractor, ASTModel, AutoConfig, AutoModel

from multimodal.encoders.registry import (
    config_from_json, forward_with_attention, json_config, local_attention_mask, register_builtin, register_encoder)
from multimodal.io import SAMPLE_RATE, AudioClip, load_audio, resample
from multimodal.types import AudioGeometry, InputError, ModalityTokens

HOP_SECONDS = 0.01  # one fbank frame (frame_shift 10 ms)
WINDOW_SECONDS = 0.025  # fbank frame length (25 ms)
WINDOW_SAMPLES = int(WINDOW_SECONDS * SAMPLE_RATE)  # 400: shorter clips are zero-padded to this
FBANK_MEAN = -4.2677393  # AudioSet statistics, as in transformers' ASTFeatureExtractor
FBANK_STD = 4.5689974
AST_PREFIX = 2  # AST's CLS + distillation tokens (dropped from the output tokens)
WINDOWS_PER_CALL = 16  # windows run through the model at once: bounds peak memory
FEATURES_FILE = "audio_features.json"  # our feature parameters next to a saved model


def fbank(clip: AudioClip, num_mel_bins: int) -> Tensor:
    """Mono clip at any rate -> log-mel filterbank `(frames, num_mel_bins)`, not normalised."""
    wav = resample(torch.from_numpy(clip.waveform).float()[None], clip.sample_rate)  # (1, n) -> (1, n')
    if wav.shape[1] < WINDOW_SAMPLES:
        wav = torch.nn.functional.pad(wav, (0, WINDOW_SAMPLES - wav.shape[1]))  # (1, 400)
    return torchaudio.compliance.kaldi.fbank(
        wav, htk_compat=True, sample_frequency=SAMPLE_RATE, use_energy=False, window_type="hanning",
        num_mel_bins=num_mel_bins, dither=0.0, frame_shift=HOP_SECONDS * 1000)  # (frames, mels)


def frame_times(num_frames: int) -> np.ndarray:
    """Centre of each fbank frame in seconds."""
    return np.arange(num_frames) * HOP_SECONDS + WINDOW_SECONDS / 2


def input_spectrogram(clip: Any, num_mel_bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """What the encoder reads, as a picture: the `(num_mel_bins, frames)` filterbank (not normalised)
    and each frame's centre time (s). (`multimodal.overlays.log_mel` is the display spectrogram.)"""
    clip = clip if isinstance(clip, AudioClip) else load_audio(clip, truncate=True)
    feats = fbank(clip, num_mel_bins)  # (frames, mels)
    return feats.T.numpy(), frame_times(feats.shape[0])


def _is_array_and_rate(x: Any) -> bool:
    return (isinstance(x, tuple) and len(x) == 2 and any(isinstance(v, np.ndarray) for v in x)
            and any(isinstance(v, (int, np.integer)) for v in x))


@register_encoder("audio")
class AudioEncoder(nn.Module):
    """AST -> time-major patch `ModalityTokens` with column times.

    `self_attention` (when asked) covers the FIRST window only: per layer `(B, heads, 2 + Nw,
    2 + Nw)`, where index 0/1 are AST's CLS/distillation tokens and `2 + t * freq_bins + f`
    is output token `t * freq_bins + f` (window 0 holds the first `max_length` frames); every
    layer, or only the layers asked for. Capture in eval mode (eager weights are post-dropout).
    """

    modality = "audio"

    def __init__(self, model: nn.Module, spec: str, mean: float = FBANK_MEAN, std: float = FBANK_STD):
        super().__init__()
        if not isinstance(model, ASTModel):
            raise InputError(f"audio encoder '{spec}' is a {type(model).__name__}; only Audio Spectrogram "
                             "Transformer (ASTModel) checkpoints are supported so far")
        self.model = model
        self.spec = spec
        self.mean, self.std = float(mean), float(std)
        cfg = model.config
        self.num_mel_bins, self.max_length = int(cfg.num_mel_bins), int(cfg.max_length)
        self.patch_size, self.time_stride = int(cfg.patch_size), int(cfg.time_stride)
        self.freq_bins, self.time_cols = model.embeddings.get_shape(cfg)  # patches per window
        self.dim = int(cfg.hidden_size)
        self.time_window = int(getattr(cfg, "time_window", 0) or 0)  # > 0: layers attend within that many columns
        self.column_only = bool(getattr(cfg, "column_only", False))  # layers attend within their own column only

    # -- construction -------------------------------------------------------------------

    @classmethod
    def _load(cls, name: str, **kwargs) -> "AudioEncoder":
        model_type = AutoConfig.from_pretrained(name).model_type
        if model_type != "audio-spectrogram-transformer":
            raise InputError(f"audio encoder '{name}' is a {model_type!r} model; only Audio Spectrogram "
                             "Transformer checkpoints are supported so far")
        return ASTModel.from_pretrained(name, **kwargs)

    @classmethod
    def from_directory(cls, path: str | os.PathLike, **kwargs) -> "AudioEncoder":
        """A folder written by `save_pretrained` (or any saved AST checkpoint)."""
        path = Path(path)
        feats = {"mean": FBANK_MEAN, "std": FBANK_STD}
        if (path / FEATURES_FILE).is_file():
            saved = json.loads((path / FEATURES_FILE).read_text())
            feats = {"mean": saved["mean"], "std": saved["std"]}
        elif (path / "preprocessor_config.json").is_file():
            fe = ASTFeatureExtractor.from_pretrained(str(path))
            feats = {"mean": fe.mean, "std": fe.std}
        return cls(cls._load(str(path), **kwargs), str(path), **feats).eval()

    @classmethod
    def from_hub(cls, name: str, **kwargs) -> "AudioEncoder":
        model = cls._load(name, **kwargs)
        try:  # the checkpoint's own normalisation statistics, when it ships a feature extractor
            fe = ASTFeatureExtractor.from_pretrained(name)
            feats = {"mean": fe.mean, "std": fe.std}
        except Exception:
            feats = {}
        return cls(model, name, **feats).eval()

    @classmethod
    def from_config(cls, d: dict, tokenizer_dir: Any = None) -> "AudioEncoder":
        model = AutoModel.from_config(config_from_json(d["model_config"]))
        return cls(model, d["spec"], **d["features"]).eval()

    def config_dict(self) -> dict:
        return {"modality": "audio", "spec": self.spec, "library": "transformers",
                "model_config": json_config(self.model.config),
                "features": {"mean": self.mean, "std": self.std}}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """transformers format (config.json + model.safetensors) + our feature parameters."""
        directory = Path(directory)
        self.model.save_pretrained(str(directory))
        (directory / FEATURES_FILE).write_text(json.dumps({
            "format": "multimodal-audio-features/1", "sample_rate": SAMPLE_RATE, "hop_seconds": HOP_SECONDS,
            "window_seconds": WINDOW_SECONDS, "num_mel_bins": self.num_mel_bins, "mean": self.mean,
            "std": self.std}, indent=1))
        return directory

    # -- running ------------------------------------------------------------------------

    def normalise(self, feats: Tensor) -> Tensor:
        return (feats - self.mean) / (self.std * 2)

    def input_spectrogram(self, clip: Any) -> tuple[np.ndarray, np.ndarray]:
        """`(num_mel_bins, frames)` filterbank with this encoder's mel bins, and frame times."""
        return input_spectrogram(clip, self.num_mel_bins)

    def preprocess(self, clips: Sequence[Any]) -> dict[str, Any]:
        """Clips -> normalised fbank windows `(B, W, max_length, mels)` + real frame counts (CPU).

        Padding is zeros in log-mel space before normalisation (as AST's feature extractor).
        """
        if not isinstance(clips, (list, tuple)) or _is_array_and_rate(clips):
            clips = [clips]  # a single clip, e.g. one (samples, rate) tuple
        if not clips:
            raise InputError("no audio given; pass a list with at least one clip")
        loaded = [c if isinstance(c, AudioClip) else load_audio(c) for c in clips]
        feats = [fbank(c, self.num_mel_bins) for c in loaded]  # each (frames_i, mels)
        frames = torch.tensor([f.shape[0] for f in feats])  # (B,)
        L = self.max_length
        W = max(1, math.ceil(int(frames.max()) / L))
        x = torch.full((len(feats), W * L, self.num_mel_bins), self.normalise(torch.tensor(0.0)).item())
        for i, f in enumerate(feats):
            x[i, : f.shape[0]] = self.normalise(f)
        return {"features": x.view(len(feats), W, L, self.num_mel_bins),  # (B, W, L, mels)
                "frames": frames, "durations": [c.duration for c in loaded]}

    def _column_starts(self, windows: int) -> Tensor:
        """First frame of every time column, all windows: `(W * T,)`."""
        t = torch.arange(self.time_cols) * self.time_stride  # (T,)
        w = torch.arange(windows) * self.max_length  # (W,)
        return (w[:, None] + t[None, :]).reshape(-1)  # (W*T,)

    def time_window_mask(self, device=None, dtype=torch.float32) -> Tensor:
        """Additive self-attention mask `(1, 1, N, N)` (0: may attend) in AST's own token order
        (CLS, distillation, then f-major patches) for `time_window > 0`: a patch attends to the patches
        of every band within `time_window` time columns of its own (within its own column for
        `column_only`), the prefix tokens to everything (`local_attention_mask`; additive, since
        transformers' eager AST path adds the mask)."""
        Fq, T = self.freq_bins, self.time_cols
        t = torch.arange(Fq * T, device=device) % T  # f-major: patch f * T + t
        reach = 0 if self.column_only else self.time_window
        keep = local_attention_mask((t[:, None] - t[None, :]).abs() <= reach, AST_PREFIX)  # (N, N)
        return torch.zeros(keep.shape, device=device, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)[None, None]

    def forward(self, batch: dict[str, Any], capture_attention: bool | Sequence[int] = False) -> ModalityTokens:
        """`capture_attention`: True for every layer's self-attention (eager `output_attentions`), or a list
        of layers for only those (`self_attention[i]` is the i-th of them in layer order; the rest stay SDPA)."""
        p = next(self.model.parameters())
        x = batch["features"].to(p.device, p.dtype)  # (B, W, L, M)
        B, W, L, M = x.shape
        Fq, T = self.freq_bins, self.time_cols
        x = x.reshape(B * W, L, M)  # (B*W, L, M), item-major
        hidden, first_window = [], []
        extra = {}
        if (self.time_window > 0 or self.column_only) and self.model.config.num_hidden_layers:
            extra["attention_mask"] = self.time_window_mask(p.device, p.dtype)
        for start in range(0, B * W, WINDOWS_PER_CALL):
            chunk = x[start:start + WINDOWS_PER_CALL]  # (n, L, M)
            keep = [r - start for r in range(start, start + chunk.shape[0]) if r % W == 0]  # items' first windows
            out, maps = forward_with_attention(self.model, {"input_values": chunk, **extra},
                                               capture_attention if keep else False, rows=keep)
            if maps is not None:
                first_window.append(maps)  # per layer (k, H, 2+F*T, 2+F*T)
            h = out.last_hidden_state[:, AST_PREFIX:]  # (n, F*T, D), conv order: f-major
            hidden.append(h.reshape(-1, Fq, T, h.shape[-1]).transpose(1, 2))  # (n, T, F, D)
        tokens = torch.cat(hidden).reshape(B, W * T * Fq, -1)  # (B, W*T*F, D), time-major

        starts = self._column_starts(W)  # (W*T,)
        real = starts[None, :] < batch["frames"][:, None]  # (B, W*T)
        mask = real.repeat_interleave(Fq, dim=1).to(tokens.device)  # (B, W*T*F)
        times = ((starts.double() + (self.patch_size - 1) / 2) * HOP_SECONDS + WINDOW_SECONDS / 2).tolist()
        geometry = AudioGeometry(times=times, freq_bins=Fq, sample_rate=SAMPLE_RATE,
                                 durations=list(batch["durations"]), hop_seconds=HOP_SECONDS, num_prefix=0)
        attention = None
        if first_window:
            # reorder AST's [CLS, DIST, f-major patches] to [CLS, DIST, time-major patches]
            order = torch.arange(Fq * T).reshape(Fq, T).T.reshape(-1) + AST_PREFIX  # (T*F,)
            perm = torch.cat([torch.arange(AST_PREFIX), order]).to(tokens.device)
            attention = [torch.cat([c[l] for c in first_window])[:, :, perm][:, :, :, perm]  # (B, H, 2+T*F, 2+T*F)
                         for l in range(len(first_window[0]))]
        return ModalityTokens(tokens=tokens, mask=mask, modality="audio", special=torch.zeros_like(mask),
                              geometry=geometry, self_attention=attention)

    def encode(self, clips: Sequence[Any], capture_attention: bool | Sequence[int] = False) -> ModalityTokens:
        return self.forward(self.preprocess(clips), capture_attention)


@register_builtin("audio", "ast-tiny-scenes")
def ast_tiny_scenes(**overrides) -> AudioEncoder:
    """2-layer, 128-wide AST on 64 mel bins, 3 s windows (300 frames), 16x16 patches, trained from scratch."""
    config = ASTConfig(**{
        "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
        "num_mel_bins": 64, "max_length": 300, "patch_size": 16, "frequency_stride": 16, "time_stride": 10,
        **overrides})
    return AudioEncoder(ASTModel(config), "ast-tiny-scenes").eval()


@register_builtin("audio", "ast-local-scenes")
def ast_local_scenes(**overrides) -> AudioEncoder:
    """Local tokens: `ast-tiny-scenes`' patch embedding and positions with no transformer layers,
    so each token holds only its own 16x16 spectrogram patch (0.16 s) and where it is."""
    return AudioEncoder(ast_tiny_scenes(**{"num_hidden_layers": 0, **overrides}).model, "ast-local-scenes").eval()



@register_builtin("audio", "ast-layerscale-scenes")
def ast_layerscale_scenes(branch_scale: float = 1e-4, **overrides) -> AudioEncoder:
    """`ast-tiny-scenes` (2 layers) whose residual branches start near zero: each layer's attention
    output projection and MLP output are initialised at `branch_scale` times their usual weights
    (biases 0), the start LayerScale gives a timm ViT (transformers' AST has no LayerScale
    parameter). At initialisation every token holds only its own patch and where it is."""
    encoder = ast_tiny_scenes(**overrides)
    with torch.no_grad():
        for layer in encoder.model.layers:
            for linear in (layer.attention.o_proj, layer.mlp.fc2):
                linear.weight.mul_(branch_scale)
                linear.bias.zero_()
    return AudioEncoder(encoder.model, "ast-layerscale-scenes").eval()


@register_builtin("audio", "ast-window-scenes")
def ast_window_scenes(branch_scale: float = 1e-4, **overrides) -> AudioEncoder:
    """`ast-layerscale-scenes` whose 2 layers attend only within one time column (0.1 s) either side,
    across every frequency band (`AudioEncoder.time_window_mask`): after both layers a token has heard
    from at most 0.2 s around its own patch, so tokens stay about when they are."""
    encoder = ast_layerscale_scenes(branch_scale, **{"time_window": 1, **overrides})
    return AudioEncoder(encoder.model, "ast-window-scenes").eval()


@register_builtin("audio", "ast-window-fine-scenes")
def ast_window_fine_scenes(branch_scale: float = 1e-4, **overrides) -> AudioEncoder:
    """`ast-window-scenes` on a finer grid: 8x8 patches 8 frames apart (one token per 8 mel bins x 0.08 s,
    8 bands x 37 columns in a 3 s window where `ast-window-scenes` has 4 x 29 of 16x16 patches 0.1 s apart), each
    layer attending within one column (0.08 s) either side. A token reads 0.08 s of sound, so a column just
    outside an event holds less of it (`benchmarks/audio_energy_ceiling.py --patch 8 --stride 8`)."""
    encoder = ast_window_scenes(branch_scale, **{"patch_size": 8, "frequency_stride": 8, "time_stride": 8,
                                                 **overrides})
    return AudioEncoder(encoder.model, "ast-window-fine-scenes").eval()


@register_builtin("audio", "ast-window-fine-mel32-scenes")
def ast_window_fine_mel32_scenes(branch_scale: float = 1e-4, **overrides) -> AudioEncoder:
    """`ast-window-fine-scenes` on 32 mel bins: 8x8 patches 8 frames apart, 4 bands x 37 columns a 3 s window
    (148 tokens where the fine grid has 296 and `ast-window-scenes` 116): each token reads 0.08 s of a quarter of
    the spectrum, as `ast-window-scenes`' 16x16 patches read 0.16 s of a quarter."""
    encoder = ast_window_fine_scenes(branch_scale, **{"num_mel_bins": 32, **overrides})
    return AudioEncoder(encoder.model, "ast-window-fine-mel32-scenes").eval()


@register_builtin("audio", "ast-window-mel40-scenes")
def ast_window_mel40_scenes(branch_scale: float = 1e-4, **overrides) -> AudioEncoder:
    """`ast-window-scenes` on patches that do not overlap: 10x10 patches 10 frames apart on 40 mel bins, 4 bands x
    30 columns a 3 s window (120 tokens; `ast-window-scenes` has 116 of 16x16 patches 0.1 s apart that read 0.16 s
    each). The default's audio encoder on 2026-12-07 (`default-2026-12-07`), before `ast-column-mel40-scenes`.
    Each token reads only its own 0.1 s, so a column just outside an event holds at most a sliver of it
    (`benchmarks/audio_energy_ceiling.py --patch 10 --stride 10`)."""
    encoder = ast_window_scenes(branch_scale, **{"num_mel_bins": 40, "patch_size": 10, "frequency_stride": 10,
                                                 "time_stride": 10, **overrides})
    return AudioEncoder(encoder.model, "ast-window-mel40-scenes").eval()


@register_builtin("audio", "ast-column-mel40-scenes")
def ast_column_mel40_scenes(branch_scale: float = 1e-4, **overrides) -> AudioEncoder:
    """`ast-window-mel40-scenes` whose 2 layers attend within their own time column only (its 4 bands), not
    one column either side: no token hears sound from outside its own 0.1 s at any depth. The default's audio
    encoder since 2026-12-07 evening (`default-2026-12-07-column`)."""
    encoder = ast_window_mel40_scenes(branch_scale, **{"column_only": True, **overrides})
    return AudioEncoder(encoder.model, "ast-column-mel40-scenes").eval()
