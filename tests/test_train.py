"""The train and eval commands on tiny budgets: checkpoints, resume, config errors, manifests."""

import json

import pytest
import torch

from multimodal.cli import main
from multimodal.data.manifest import scene_to_manifest_row, write_manifest
from multimodal.data.scenes import generate_scene
from multimodal.evaluate import evaluate, write_report
from multimodal.model import MultimodalModel
from multimodal.train import load_config, train
from multimodal.types import InputError

TINY = {"fusion.dim": 32, "fusion.heads": 2}


def smoke(**overrides):
    return load_config("smoke", overrides={**TINY, **overrides})


def test_train_writes_a_loadable_checkpoint_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    summary = train(smoke(steps=3, checkpoint_every=3), out, progress=False)
    assert summary["steps"] == 3
    assert {"config.json", "model.safetensors", "train_state.safetensors", "train_state.json"} <= {
        p.name for p in out.iterdir()}
    first = MultimodalModel.from_pretrained(out)
    assert first.meta["step"] == 3 and first.meta["train_config"]["steps"] == 3

    summary = train(smoke(steps=5, checkpoint_every=5), out, resume=True, progress=False)
    assert summary["steps"] == 5
    resumed = MultimodalModel.from_pretrained(out)
    assert resumed.meta["step"] == 5
    changed = [not torch.equal(a, b) for a, b in zip(first.state_dict().values(), resumed.state_dict().values())]
    assert any(changed), "resuming trained nothing"


def test_same_seed_gives_the_same_weights(tmp_path):
    a = train(smoke(steps=2), tmp_path / "a", progress=False)
    b = train(smoke(steps=2), tmp_path / "b", progress=False)
    assert a["history"][-1]["loss"] == b["history"][-1]["loss"]
    wa = MultimodalModel.from_pretrained(tmp_path / "a").state_dict()
    wb = MultimodalModel.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_config_keys_and_values_are_refused_by_name(tmp_path):
    with pytest.raises(InputError, match="'stepz'"):
        load_config("smoke", overrides={"stepz": 3})
    with pytest.raises(InputError, match="fusion"):
        load_config("smoke", overrides={"fusion.hedas": 3})
    with pytest.raises(InputError, match="scene"):
        load_config("smoke", overrides={"scene.colour_count": 3})
    with pytest.raises(InputError, match="preset"):
        load_config("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = [")
    with pytest.raises(InputError, match="bad.toml"):
        load_config(path=bad)


def test_train_on_a_manifest_skips_bad_rows_by_number(tmp_path, capsys):
    rows = [scene_to_manifest_row(generate_scene(s), tmp_path / "data", f"s{s}") for s in range(6)]
    rows.insert(2, {"caption": "a red circle", "image": "missing.png"})
    manifest = write_manifest(rows, tmp_path / "data" / "pairs.jsonl")
    out = tmp_path / "run"
    summary = train(smoke(manifest=str(manifest), steps=2, batch_size=4), out, progress=False)
    printed = capsys.readouterr().out
    assert "row 3" in printed and "missing.png" in printed
    assert summary["steps"] == 2
    assert MultimodalModel.from_pretrained(out).modalities == ["text", "image", "audio"]


def test_eval_reports_every_head_and_the_baselines(tmp_path):
    train(smoke(steps=2), tmp_path / "run", progress=False)
    model = MultimodalModel.from_pretrained(tmp_path / "run")
    result = evaluate(model, scenes=6, seed=0, progress=False)
    json_path, md_path = write_report(result, tmp_path / "run")
    saved = json.loads(open(json_path).read())
    assert 0.0 <= saved["matching"]["all"]["accuracy"] <= 1.0 and saved["matching"]["all"]["pairs"] == 6
    text = open(md_path).read()
    for word in ("uniform", "random", "relevance", "pointing"):
        assert word in text, word
    for mod in ("image", "audio"):
        heads = {(r["layer"], r["head"]) for r in saved["heads"] if r["modality"] == mod}
        assert heads == {(l, h) for l in range(2) for h in range(2)}, mod
        assert set(saved["baselines"][mod]) == {"uniform", "random_init", "grad_relevance"}
        assert 0.0 <= saved["summary"][mod]["best_pointing"] <= 1.0


def test_train_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--preset", "smoke", "--set", "steps=2", "--set", "fusion.dim=32",
                 "--set", "fusion.heads=2", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert main(["train", "--preset", "smoke", "--set", "stepz=2", "--out", str(out)]) != 0
    assert "stepz" in capsys.readouterr().err


def test_scenes_command_writes_samples_and_a_loadable_manifest(tmp_path):
    from multimodal.data.manifest import load_manifest

    assert main(["scenes", "--out", str(tmp_path / "one"), "--seeds", "7", "--name", "sample"]) == 0
    assert {p.name for p in (tmp_path / "one").iterdir()} == {
        "sample.png", "sample.wav", "sample.json", "sample_masks.png"}
    assert json.loads((tmp_path / "one" / "sample.json").read_text())["caption"] == generate_scene(7).caption

    assert main(["scenes", "--out", str(tmp_path / "many"), "--count", "3", "--manifest"]) == 0
    rows, errors = load_manifest(tmp_path / "many" / "manifest.jsonl", progress=False)
    assert len(rows) == 3 and not errors
