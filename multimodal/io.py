"""Loading user inputs (images, audio, text), validated once at the boundary.

Everything past these functions trusts its input: RGB PIL images of a sane size, mono
float32 waveforms with finite samples, non-empty stripped text. Every refusal is an
`InputError` whose message says what was wrong and what to do.
"""

from __future__ import annotations

import re

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image, ImageOps, UnidentifiedImageError

from multimodal.types import InputError

MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused (decompression bombs)
MIN_IMAGE_SIDE = 8  # pixels
MAX_AUDIO_SECONDS = 600.0  # longer clips are refused unless truncate=True
MAX_TEXT_CHARS = 2000
SAMPLE_RATE = 16_000  # Hz: every clip is resampled to this before features, scenes are made at it (its one home)

# PIL warns above this many pixels and refuses above twice as many; we refuse above it.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

_INT_SCALE = {np.dtype(np.int8): 2.0 ** 7, np.dtype(np.int16): 2.0 ** 15, np.dtype(np.int32): 2.0 ** 31}


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------


def _too_large(width: int, height: int) -> InputError:
    return InputError(f"image is {width}x{height} = {width * height:,} pixels, above the limit of "
                      f"{MAX_IMAGE_PIXELS:,}; downscale it (e.g. to 4000 pixels on the long side) and try again")


def _file_or_bytes(src: str | os.PathLike | bytes, kind: str, formats: str) -> Any:
    """Bytes -> a readable buffer; a path -> the Path, refused with a message if it is not a file."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    path = Path(src).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise InputError(f"{kind} file {path} {what}; give the path of {formats}")
    return path


def _open_image(src: str | os.PathLike | bytes, name: str) -> Image.Image:
    """Open and fully decode an image file or its bytes; PIL's bomb warning becomes an error."""
    fp = _file_or_bytes(src, "image", "a PNG, JPEG, BMP, GIF, TIFF or WebP file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{name} is too large to decode safely ({e}); downscale it below "
                         f"{MAX_IMAGE_PIXELS:,} pixels and try again") from None
    except UnidentifiedImageError:
        raise InputError(f"{name} is not an image PIL can read (corrupt, empty or another file type); "
                         "give a PNG, JPEG, BMP, GIF, TIFF or WebP image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name} could not be decoded ({e}); the file is probably truncated or corrupt: "
                         "re-export or re-download it") from None
    try:
        return ImageOps.exif_transpose(img)  # show it the way viewers do, so overlays line up
    except Exception:  # broken EXIF is not worth refusing the image for
        return img


def _array_to_image(arr: np.ndarray) -> Image.Image:
    """uint8 (H, W[, C]) array -> PIL image (uint16 and floats in [0, 1] are accepted too)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]  # (H, W)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InputError(f"image array has shape {arr.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if arr.dtype == np.uint16:
        arr = (arr.astype(np.float32) / 257.0).round().astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise InputError("float image arrays must hold finite values in [0, 1]; "
                             "pass uint8 (0-255) pixels instead")
        arr = (arr * 255.0).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise InputError(f"image array has dtype {arr.dtype}; convert it to uint8 (0-255) pixels")
    return Image.fromarray(np.ascontiguousarray(arr))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16/32-bit greys scaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img).astype(np.float64)  # (H, W)
        if mode.startswith("I;16"):
            a = a / 257.0
        elif mode == "F" and a.size and np.nanmax(a) <= 1.0:
            a = a * 255.0
        elif a.size and np.nanmax(a) > 255:  # 32-bit int / float holding 16-bit data
            a = a / 257.0 if np.nanmax(a) <= 65535 else a * (255.0 / np.nanmax(a))
        a = np.nan_to_num(a).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    try:
        return img.convert("RGB")  # L, 1, CMYK, YCbCr, ...
    except (ValueError, OSError) as e:
        raise InputError(f"image mode {mode!r} cannot be converted to RGB ({e}); save it as an RGB PNG or JPEG") from None


def load_image(src: Any) -> Image.Image:
    """A path, encoded bytes, PIL image or uint8 array (H, W[, C]) -> validated RGB PIL image."""
    if isinstance(src, Image.Image):
        name, img = "image", src
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise _too_large(w, h)
    elif isinstance(src, np.ndarray):
        name = "image array"
        if src.ndim >= 2 and src.shape[0] * src.shape[1] > MAX_IMAGE_PIXELS:
            raise _too_large(src.shape[1], src.shape[0])
        img = _array_to_image(src)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        name = "image data"
        img = _open_image(src, name)
    elif isinstance(src, (str, os.PathLike)):
        name = f"image file {src}"
        img = _open_image(src, name)
    else:
        raise InputError(f"cannot read an image from a {type(src).__name__}; give a file path, the file's "
                         "bytes, a PIL image or a uint8 numpy array (H, W[, C])")
    w, h = img.size
    if min(w, h) < MIN_IMAGE_SIDE:
        raise InputError(f"{name} is only {w}x{h} pixels; both sides must be at least {MIN_IMAGE_SIDE} pixels. "
                         "Give a larger image")
    return _to_rgb(img)


# ---------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------


@dataclass
class AudioClip:
    """A mono clip at its original sample rate. `notice` says what loading changed (e.g. truncation)."""

    waveform: np.ndarray  # (n,) float32 in [-1, 1]
    sample_rate: int
    notice: str | None = None

    @property
    def duration(self) -> float:
        return len(self.waveform) / self.sample_rate


def _samples_to_float(x: np.ndarray) -> np.ndarray:
    """Integer PCM (int8/uint8/int16/int32) or float samples -> float32 in [-1, 1]."""
    if x.dtype == np.uint8:  # 8-bit PCM is unsigned, centred on 128
        return (x.astype(np.float32) - 128.0) / 128.0
    if x.dtype in _INT_SCALE:
        return (x.astype(np.float64) / _INT_SCALE[x.dtype]).astype(np.float32)
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32)
    raise InputError(f"audio samples have dtype {x.dtype}; use int8, uint8, int16, int32 or float samples")


def _read_audio_file(src: str | os.PathLike | bytes, name: str, truncate: bool, max_seconds: float,
                     limit_name: str) -> tuple[np.ndarray, int, str | None]:
    fp = _file_or_bytes(src, "audio", "a WAV, FLAC, OGG or MP3 file")
    try:
        info = sf.info(fp)
        if isinstance(fp, io.BytesIO):
            fp.seek(0)
        frames, notice = -1, None
        if info.samplerate > 0 and info.frames / info.samplerate > max_seconds:  # read only what is kept
            notice = _over_limit(info.frames / info.samplerate, truncate, max_seconds, limit_name)
            frames = int(max_seconds * info.samplerate)
        data, sr = sf.read(fp, frames=frames, dtype="float32", always_2d=True)  # (n, channels)
    except InputError:
        raise
    except Exception as e:  # libsndfile reports unknown formats and damaged files alike
        raise InputError(f"{name} could not be read as audio ({e}). Supported formats are WAV, FLAC, OGG/Vorbis "
                         "and MP3; convert other files first, e.g. `ffmpeg -i in.m4a out.wav`") from None
    return data, int(sr), notice


def _over_limit(seconds: float, truncate: bool, max_seconds: float, limit_name: str) -> str:
    if not truncate:
        raise InputError(f"audio is {seconds:.1f} s long, above {limit_name} limit of {max_seconds:.0f} s; "
                         "cut it shorter, or pass truncate=True to keep only the start")
    return f"the audio is {seconds:.1f} s long; only its first {max_seconds:.0f} s were used ({limit_name} limit)"


def _array_and_rate(src: tuple) -> tuple[np.ndarray, int]:
    """(array, rate) or gradio's (rate, array) -> (array, rate)."""
    if len(src) != 2:
        raise InputError("audio tuples must be (samples, sample_rate)")
    a, b = src
    if isinstance(a, (int, np.integer)) and not isinstance(b, (int, np.integer)):
        a, b = b, a
    try:
        rate = int(b)
    except (TypeError, ValueError):
        raise InputError(f"audio sample rate {b!r} is not a number; give (samples, sample_rate)") from None
    if rate <= 0 or rate != b:
        raise InputError(f"audio sample rate {b!r} must be a positive whole number of Hz")
    return np.asarray(a), rate


def load_audio(src: Any, truncate: bool = False, max_seconds: float = MAX_AUDIO_SECONDS,
               limit_name: str = "the") -> AudioClip:
    """A path, encoded bytes or (samples, sample_rate) -> mono float32 clip (no resampling).

    Samples may be (n,) or (n, channels), int8/uint8/int16/int32/float. Clips longer than
    `max_seconds` (at most MAX_AUDIO_SECONDS) are refused unless `truncate`, which keeps the
    start (a file is read only that far) and sets `notice`; `limit_name` names whose limit it is
    in messages ("the demo's").
    """
    max_seconds = min(float(max_seconds), MAX_AUDIO_SECONDS)
    notice = None
    if isinstance(src, AudioClip):
        data, sr, name = np.asarray(src.waveform), src.sample_rate, "audio clip"
    elif isinstance(src, tuple):
        data, sr = _array_and_rate(src)
        name = "audio array"
    elif isinstance(src, (bytes, bytearray, memoryview)):
        name = "audio data"
        data, sr, notice = _read_audio_file(src, name, truncate, max_seconds, limit_name)
    elif isinstance(src, (str, os.PathLike)):
        name = f"audio file {src}"
        data, sr, notice = _read_audio_file(src, name, truncate, max_seconds, limit_name)
    else:
        raise InputError(f"cannot read audio from a {type(src).__name__}; give a file path, the file's bytes "
                         "or a (samples, sample_rate) tuple")

    if data.ndim == 2 and data.shape[0] < data.shape[1] and data.shape[0] <= 16:
        data = data.T  # (channels, n) -> (n, channels)
    if data.ndim not in (1, 2):
        raise InputError(f"{name} has shape {data.shape}; expected (n,) or (n, channels) samples")
    if data.size == 0:
        raise InputError(f"{name} has no samples (zero length); give a clip with sound in it")
    x = _samples_to_float(data)
    if x.ndim == 2:
        x = x.mean(axis=1)  # (n,) stereo mixed down
    if not np.isfinite(x).all():
        raise InputError(f"{name} contains NaN or infinite samples; fix or re-export the audio")
    if len(x) / sr > max_seconds and notice is None:
        notice = _over_limit(len(x) / sr, truncate, max_seconds, limit_name)
        x = x[: int(max_seconds * sr)]
    return AudioClip(np.ascontiguousarray(x, dtype=np.float32), sr, notice)


# ---------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------


def resample(wave: Any, rate: int) -> Any:
    """Samples `(..., n)` at `rate` -> `(..., n')` at SAMPLE_RATE (torchaudio's sinc resampler);
    a tensor stays a tensor, an array stays a float32 array; at SAMPLE_RATE already: unchanged."""
    if int(rate) == SAMPLE_RATE:
        return wave
    import torch
    import torchaudio

    t = wave if isinstance(wave, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(wave))
    out = torchaudio.functional.resample(t, int(rate), SAMPLE_RATE)
    return out if isinstance(wave, torch.Tensor) else out.numpy().astype(np.float32)


def check_text(text: Any, max_chars: int = MAX_TEXT_CHARS, limit_name: str = "the") -> str:
    """Strip and validate a caption or query (at most `max_chars`, itself at most MAX_TEXT_CHARS)."""
    max_chars = min(int(max_chars), MAX_TEXT_CHARS)
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise InputError("text is empty; type a caption or a question, e.g. 'a red circle and a rising chirp'")
    if len(text) > max_chars:
        raise InputError(f"the text is {len(text):,} characters long, above {limit_name} limit of {max_chars:,}; "
                         "shorten it")
    return text


def text_words(text: str) -> list[str]:
    """The words of a caption, lowercased, in order (runs of letters and digits; punctuation and
    emoji are not words)."""
    return re.findall(r"[^\W_]+", text.lower())
