"""Hostile inputs on the command line: every damaged checkpoint in every subcommand that takes
`--model`, and the CLI's own arguments, end in one `error: ...` line naming the user's file, never
a traceback, and lose nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from multimodal import FusionConfig
from multimodal.cli import main
from multimodal.model import MultimodalModel

CAPTION = "a red circle and a rising chirp"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = FusionConfig(dim=32, heads=2, layers=1, query="text")
    return Path(MultimodalModel.from_specs(fusion=cfg).save_pretrained(tmp_path_factory.mktemp("good") / "ckpt"))


def _damage(good: Path, root: Path, kind: str) -> Path:
    d = root / kind
    shutil.copytree(good, d)
    cfg, weights = d / "config.json", d / "model.safetensors"
    if kind == "invalid_json":
        cfg.write_text(cfg.read_text()[:-20])
    elif kind == "json_not_object":
        cfg.write_text("[1, 2, 3]")
    elif kind == "missing_keys":
        c = json.loads(cfg.read_text())
        del c["encoders"]
        cfg.write_text(json.dumps(c))
    elif kind == "bad_fusion_key":
        c = json.loads(cfg.read_text())
        c["fusion"]["heads_typo"] = 3
        cfg.write_text(json.dumps(c))
    elif kind == "other_format":
        c = json.loads(cfg.read_text())
        c["format"] = "multimodal-sandbox/0"
        cfg.write_text(json.dumps(c))
    elif kind == "wrong_shapes":
        c = json.loads(cfg.read_text())
        c["fusion"]["dim"] = 48
        cfg.write_text(json.dumps(c))
    elif kind == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "garbage_weights":
        weights.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "empty_weights":
        weights.write_bytes(b"")
    elif kind == "missing_weights":
        weights.unlink()
    elif kind == "damaged_tokenizer":  # (a missing one is rebuilt for the built-in text encoders)
        (d / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"')
    elif kind == "not_utf8_config":
        cfg.write_bytes(b"\xff\xfe" + cfg.read_bytes())
    return d


KINDS = ["invalid_json", "json_not_object", "missing_keys", "bad_fusion_key", "other_format", "wrong_shapes",
         "truncated_weights", "garbage_weights", "empty_weights", "missing_weights", "damaged_tokenizer",
         "not_utf8_config"]


@pytest.fixture(scope="module")
def corpus(good, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damaged")
    return {kind: _damage(good, root, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(d / "img.png")
    t = np.arange(16000) / 16000
    sf.write(d / "clip.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    sf.write(d / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(d / "tiny.wav", np.full(1, 0.5, np.float32), 16000)  # one sample: 0.06 ms
    (d / "caption.txt").write_text(CAPTION)
    (d / "latin1.txt").write_bytes("a caf\xe9 and a tone".encode("latin-1"))
    (d / "a_file").write_text("I am a file, not a folder")
    return d


def _one_error_line(capsys, rc: int, *names: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    assert all(n in lines[-1] for n in names), (names, lines[-1])
    return lines[-1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["maps", "eval", "demo"])
def test_every_damaged_checkpoint_gives_one_line_in_every_subcommand(corpus, inputs, tmp_path, capsys, kind,
                                                                    command):
    model = str(corpus[kind])
    before = {p.name: p.read_bytes() for p in corpus[kind].rglob("*") if p.is_file()}
    args = {"maps": ["maps", "--image", str(inputs / "img.png"), "--text", CAPTION, "--out", str(tmp_path / "o")],
            "eval": ["eval", "--scenes", "2", "--no-baselines", "--out", str(tmp_path / "o")],
            "demo": ["demo", "--port", "1"]}[command]
    rc = main(args + ["--model", model])
    _one_error_line(capsys, rc, model)
    after = {p.name: p.read_bytes() for p in corpus[kind].rglob("*") if p.is_file()}
    assert after == before  # nothing was "repaired" or deleted


@pytest.mark.parametrize("case, words", [
    ("missing text file", ["no such file"]),
    ("latin-1 text file", ["not UTF-8"]),
    ("text file is a folder", ["is a folder"]),
    ("out is a file", ["is an existing file"]),
    ("a CUDA device this machine lacks", ["CUDA"]),
    ("one-sample clip", ["0.06 ms", "shorter than"]),
])
def test_cli_arguments_are_refused_with_one_line(good, inputs, tmp_path, capsys, case, words):
    if case == "a CUDA device this machine lacks":  # one past the last GPU: none here, any count elsewhere
        words = ["no CUDA GPU is visible"] if not torch.cuda.is_available() else [
            f"has {torch.cuda.device_count()} CUDA device(s)"]
    base = ["maps", "--model", str(good), "--image", str(inputs / "img.png")]
    extra = {
        "missing text file": ["--text-file", str(tmp_path / "nope.txt")],
        "latin-1 text file": ["--text-file", str(inputs / "latin1.txt")],
        "text file is a folder": ["--text-file", str(inputs)],
        "out is a file": ["--text", CAPTION, "--out", str(inputs / "a_file")],
        "a CUDA device this machine lacks": ["--text", CAPTION, "--device", f"cuda:{torch.cuda.device_count()}"],
        "one-sample clip": ["--text", CAPTION, "--audio", str(inputs / "tiny.wav")],
    }[case]
    rc = main(base + extra + (["--out", str(tmp_path / "o")] if "--out" not in extra else []))
    _one_error_line(capsys, rc, *words)
    assert (inputs / "a_file").read_text() == "I am a file, not a folder"


def test_maps_gives_the_apps_notices(good, inputs, tmp_path, capsys):
    """A silent clip runs, with the same notice the app shows, and the notice is in summary.json."""
    rc = main(["maps", "--model", str(good), "--image", str(inputs / "img.png"), "--audio",
               str(inputs / "silent.wav"), "--text", CAPTION, "--out", str(tmp_path / "o")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "note: the audio clip is silent" in err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert any("silent" in n for n in summary["notices"])
