"""First step of both quick-start commands: the torch trio loads together and torchaudio works.

Loads torch, torchvision and torchaudio, checks that torchaudio's compiled extension loaded, runs
one op from it (`lfilter`) and computes the project's filterbank (Kaldi fbank, 128 mel bins) on
1 s of audio. On failure it prints one message naming the versions found, the versions the lock
pins, and what to do, and exits 1. Standard library only until the imports it checks.

    .venv/bin/python requirements/check_env.py
"""

from __future__ import annotations

import math
import sys
from importlib import metadata
from pathlib import Path

TRIO = ("torch", "torchvision", "torchaudio")
LOCK = Path(__file__).with_name("lock-cpu.txt")


def installed() -> dict[str, str]:
    found = {}
    for name in TRIO:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def pinned() -> dict[str, str]:
    pins = {}
    if LOCK.is_file():
        for line in LOCK.read_text().splitlines():
            name, _, version = line.split(";")[0].strip().partition("==")
            if name in TRIO:
                pins[name] = version
    return pins


def check() -> None:
    """Raise on any failure of the trio or torchaudio's compiled extension."""
    import torch
    import torchaudio
    import torchvision  # noqa: F401  (its own extension loads at import)
    from torchaudio._extension import _IS_TORCHAUDIO_EXT_AVAILABLE

    if not _IS_TORCHAUDIO_EXT_AVAILABLE:
        raise RuntimeError("torchaudio's compiled extension (libtorchaudio) is not available")
    rate = 16000
    t = torch.arange(rate, dtype=torch.float32) / rate
    wave = (0.5 * torch.sin(2 * math.pi * 440.0 * t))[None]  # (1, 16000): 1 s of a 440 Hz tone
    filtered = torchaudio.functional.lfilter(wave, torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.0]))  # C++ op
    fbank = torchaudio.compliance.kaldi.fbank(filtered, sample_frequency=rate, num_mel_bins=128,
                                              frame_length=25.0, frame_shift=10.0, window_type="hanning")
    if fbank.shape != (98, 128) or not bool(torch.isfinite(fbank).all()):
        raise RuntimeError(f"the filterbank of 1 s of audio came out wrong: shape {tuple(fbank.shape)}")


def main() -> int:
    try:
        check()
    except Exception as e:  # ImportError, OSError (undefined symbol), RuntimeError: one message for all
        found = ", ".join(f"{k} {v}" for k, v in installed().items())
        want = ", ".join(f"{k} {v}" for k, v in pinned().items()) or "(no lock file found)"
        print(f"environment check failed: torchaudio could not compute a filterbank "
              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).\n"
              f"  found:  {found}\n  locked: {want}\n"
              f"  fix:    rm -rf .venv and run the quick-start command again (it installs from "
              f"requirements/lock-cpu.txt); the three must be installed together at the locked versions",
              file=sys.stderr)
        return 1
    print("environment check: " + ", ".join(f"{k} {v}" for k, v in installed().items()) + "; torchaudio OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
