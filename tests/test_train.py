"""The train and eval commands on tiny budgets: checkpoints, resume, config errors, manifests."""

import copy
import json
import math
import sys

import numpy as np
import pytest
import torch

from multimodal.card import model_card
from multimodal.cli import main
from multimodal.data.manifest import scene_to_manifest_row, write_manifest
from multimodal.data.scenes import generate_scene
from multimodal.evaluate import evaluate, write_report
from multimodal.model import ORDER_BIAS_INIT, ORDER_SCALE_INIT, MultimodalModel
from multimodal.train import NegativeMining, build_model, contrastive_loss, load_config, train
from multimodal.train.loop import own_encoder_layout
from multimodal.types import InputError, ModalityTokens

TINY = {"fusion.dim": 32, "fusion.heads": 2, "fusion.layers": 2}  # two layers: per-layer paths are exercised


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


def test_the_progress_line_estimates_the_time_left_from_the_recent_rate():
    """The curriculum's first steps are faster than the rest: the estimate follows the last stretch's rate."""
    from multimodal.train.loop import _heartbeat_line

    # 160 steps in 200 s, the last 80 of them in 120 s: 1.50 s a step now, 1,440 steps left -> 36 min
    assert _heartbeat_line(160, 1600, 3.2144, 0.6121, 200.0, 160, (120.0, 80)) == (
        "step 160/1600: loss 3.214, train acc 0.612; 1.50 s a step over the last 80 (1.25 since the start), "
        "about 36 min to go")
    # the first line (or the first after a restart) has only the rate since the start: 80 steps in 100 s
    assert _heartbeat_line(80, 1600, 3.0, 0.5, 100.0, 80, (100.0, 80)) == (
        "step 80/1600: loss 3.000, train acc 0.500; 1.25 s a step, about 32 min to go")
    assert _heartbeat_line(1588, 1600, 3.0, 0.5, 100.0, 80, None).endswith("1.25 s a step, about 15 s to go")


def test_without_the_progress_bar_training_prints_a_line_every_twentieth_of_the_run(tmp_path, capsys, monkeypatch):
    """A study's worker (progress off, stdout to log.txt) still shows where the run is and how long is left."""
    import re

    from multimodal.train.loop import heartbeat_every

    assert [heartbeat_every(n) for n in (4, 20, 1600)] == [1, 1, 80]
    train(smoke(steps=4), tmp_path / "quiet", progress=False)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"step \d+/4: ", ln)]
    assert [ln.split(":")[0] for ln in lines] == ["step 1/4", "step 2/4", "step 3/4"]  # the end has its own line
    assert re.fullmatch(r"step 1/4: loss \d+\.\d{3}, train acc [01]\.\d{3}; \d+\.\d\d s a step, "
                        r"about \d+ s to go", lines[0]), lines
    assert all(re.fullmatch(r"step \d/4: loss \d+\.\d{3}, train acc [01]\.\d{3}; \d+\.\d\d s a step over the "
                            r"last 1 \(\d+\.\d\d since the start\), about \d+ s to go", ln) for ln in lines[1:]), lines
    train(smoke(steps=4), tmp_path / "bar", progress=True)
    assert not re.search(r"^step \d+/4: ", capsys.readouterr().out, re.M)  # the bar says it there
    # the command line: lines into a log file (stderr not a terminal, as under capsys), the bar on a terminal
    args = ["train", "--preset", "smoke", "--set", "steps=4", "--set", "fusion.dim=32", "--set", "fusion.heads=2",
            "--set", "fusion.layers=1"]
    assert main([*args, "--out", str(tmp_path / "log")]) == 0
    said = capsys.readouterr()
    assert re.findall(r"^step \d/4: ", said.out, re.M) == ["step 1/4: ", "step 2/4: ", "step 3/4: "]
    assert "training:" not in said.err  # no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*args, "--out", str(tmp_path / "terminal")]) == 0
    said = capsys.readouterr()
    assert not re.search(r"^step \d+/4: ", said.out, re.M) and "training:" in said.err


def test_same_seed_gives_the_same_weights(tmp_path):
    a = train(smoke(steps=2), tmp_path / "a", progress=False)
    b = train(smoke(steps=2), tmp_path / "b", progress=False)
    assert a["history"][-1]["loss"] == b["history"][-1]["loss"]
    wa = MultimodalModel.from_pretrained(tmp_path / "a").state_dict()
    wb = MultimodalModel.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_stalled_start_restarts_itself_and_says_so(tmp_path, capsys):
    """A start whose running loss is above stall_loss at stall_step begins again from fresh weights and
    data draws, at most stall_restarts times; the log, the summary and the checkpoint record it, and a
    run that does not stall is the run without the check, bit for bit."""
    never = train(smoke(steps=4, stall_step=2, stall_loss=1e9), tmp_path / "never", progress=True)
    plain = train(smoke(steps=4, stall_restarts=0), tmp_path / "plain", progress=False)
    assert never["restarts"] == [] and never["history"][-1]["loss"] == plain["history"][-1]["loss"]
    capsys.readouterr()
    # stall_loss -1: every start "stalls" at step 2; two restarts allowed, then the third start runs to the end
    summary = train(smoke(steps=4, stall_step=2, stall_loss=-1.0, stall_restarts=2), tmp_path / "stalls")
    log = "".join(capsys.readouterr())
    assert log.count("this start has stalled") == 2 and "start 3 of at most 3" in log
    assert [r["start"] for r in summary["restarts"]] == [2, 3] and all(r["step"] == 2 for r in summary["restarts"])
    assert summary["steps"] == 4 and [h["step"] for h in summary["history"]] == [3, 4]  # the last start's only
    weights = MultimodalModel.from_pretrained(tmp_path / "stalls").state_dict()
    plain_weights = MultimodalModel.from_pretrained(tmp_path / "plain").state_dict()
    assert any(not torch.equal(weights[k], plain_weights[k]) for k in weights)
    tc = smoke()
    assert any(not torch.equal(a, b) for a, b in zip(build_model(tc, attempt=1).state_dict().values(),
                                                    build_model(tc).state_dict().values()))
    with pytest.raises(InputError, match="stall_restarts"):
        smoke(stall_restarts=-1)


def test_a_stalled_start_is_never_checkpointed(tmp_path, monkeypatch):
    """The stall check comes before the step's checkpoint: with checkpoint_every = stall_step, a crash in the
    restarted start leaves no checkpoint of the stalled one, whose resume would skip the restart."""
    import multimodal.train.loop as train_module

    calls, original = [], train_module.training_step

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the first step of the second start
            raise RuntimeError("crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_step", crashing)
    with pytest.raises(RuntimeError, match="crash"):
        train(smoke(steps=4, stall_step=2, stall_loss=-1.0, stall_restarts=1, checkpoint_every=2), tmp_path / "run",
              progress=False)
    assert not (tmp_path / "run" / "train_state.json").exists()


def test_encoder_depth_and_window_reach_the_built_in_encoders():
    """encoder_depth / encoder_window give the image and audio built-ins N blocks / layers attending within
    N cells / columns (what the encoder-depth study varies); -1 leaves them as built."""
    tc = smoke(image_encoder="vit-layerscale-scenes", audio_encoder="ast-layerscale-scenes", encoder_depth=4,
               encoder_window=1)
    model = build_model(tc)
    image, audio = model.encoders["image"], model.encoders["audio"]
    assert len(image.model.blocks) == 4 and image.model.window == 1
    assert audio.model.config.num_hidden_layers == 4 and audio.time_window == 1
    plain = build_model(smoke(image_encoder="vit-layerscale-scenes", audio_encoder="ast-layerscale-scenes"))
    assert len(plain.encoders["image"].model.blocks) == 2 and plain.encoders["audio"].time_window == 0
    assert len(build_model(smoke(encoder_depth=0)).encoders["image"].model.blocks) == 0
    # a window set here is the layers' reach on a column-only built-in too, and no window builds column-only
    column = build_model(smoke(audio_encoder="ast-column-mel40-scenes", encoder_window=1)).encoders["audio"]
    assert (column.time_window, column.column_only) == (1, False)
    assert build_model(smoke(audio_encoder="ast-column-mel40-scenes")).encoders["audio"].column_only
    assert own_encoder_layout("vit-window-fine-wide-scenes", "ast-column-mel40-scenes") is None
    assert own_encoder_layout("vit-window-fine-wide-scenes", "ast-window-mel40-scenes") == (2, 1)
    with pytest.raises(InputError, match="does not take"):  # the timm-registry ViT has no window
        build_model(smoke(image_encoder="vit-tiny-scenes", encoder_window=1))
    with pytest.raises(InputError, match="not a built-in"):
        build_model(smoke(image_encoder="/some/folder", encoder_depth=2))
    with pytest.raises(InputError, match="encoder_depth"):
        smoke(encoder_depth=-2)


def test_captions_about_one_modality_train_on_such_captions(tmp_path, monkeypatch):
    """captions = "audio": every caption the run draws (curriculum and full scenes) names events only."""
    import multimodal.train.loop as train_module

    seen, original = [], train_module.candidate_captions

    def recording(pool, idx, *args, **kwargs):
        seen.extend({p["target"] for p in pool.scenes[i].phrases} for i in idx)
        return original(pool, idx, *args, **kwargs)

    monkeypatch.setattr(train_module, "candidate_captions", recording)
    train(smoke(steps=3, curriculum_steps=1, captions="audio"), tmp_path / "run", progress=False)
    assert len(seen) == 3 * 4 and all(targets == {"event"} for targets in seen)
    with pytest.raises(InputError, match="captions='video'"):
        smoke(captions="video")


def test_bad_config_keys_and_values_are_refused_by_name(tmp_path):
    with pytest.raises(InputError, match="'stepz'"):
        load_config("smoke", overrides={"stepz": 3})
    with pytest.raises(InputError, match="fusion"):
        load_config("smoke", overrides={"fusion.hedas": 3})
    with pytest.raises(InputError, match="scene"):
        load_config("smoke", overrides={"scene.colour_count": 3})
    with pytest.raises(InputError, match="preset"):
        load_config("nope")
    # `--set repeat_negatives=False` reads as the string "False" (TOML's is false), which is truthy: refused
    from multimodal.train.config import parse_override
    with pytest.raises(InputError, match="repeat_negatives='False' is a switch: write true or false"):
        load_config("smoke", overrides=dict([parse_override("repeat_negatives=False")]))
    assert load_config("smoke", overrides=dict([parse_override("repeat_negatives=false")])).repeat_negatives is False
    with pytest.raises(InputError, match="FusionConfig.compete='False': is a switch"):
        load_config("smoke", overrides=dict([parse_override("fusion.compete=False")]))
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
    model = MultimodalModel.from_pretrained(out)
    assert model.modalities == ["text", "image", "audio"]
    # the words it knows are those of its training rows (the last row is held out for validation)
    from multimodal.io import text_words

    trained = [generate_scene(s).caption for s in range(6)][:-1]
    assert model.meta["caption_words"] == sorted({w for c in trained for w in text_words(c)})


def test_eval_reports_every_head_and_the_baselines(tmp_path):
    train(smoke(steps=2), tmp_path / "run", progress=False)
    model = MultimodalModel.from_pretrained(tmp_path / "run")
    result = evaluate(model, scenes=6, seed=0, progress=False, min_pairs=4, batch_size=4)
    json_path, md_path = write_report(result, tmp_path / "run")
    saved = json.loads(open(json_path).read())
    assert 0.0 <= saved["matching"]["all"]["accuracy"] <= 1.0 and saved["matching"]["all"]["pairs"] == 6
    text = open(md_path).read()
    for word in ("uniform", "random", "relevance", "pointing", "the grid's ceiling"):
        assert word in text, word
    for mod in ("image", "audio"):
        heads = {(r["layer"], r["head"]) for r in saved["heads"] if r["modality"] == mod}
        assert heads == {(l, h) for l in range(2) for h in range(2)}, mod
        assert set(saved["baselines"][mod]) == {"uniform", "random_init", "grad_relevance", "region"}
        # the region-share map (the token grid's ceiling) always points within the tolerance; strictly it
        # misses only objects that cover no cell centre (audio: every event holds a column centre)
        region = saved["baselines"][mod]["region"]
        assert region["best_pointing"] == 1.0 and region["best_pointing_strict"] >= (0.5 if mod == "image" else 1.0)
        assert 0.0 <= saved["summary"][mod]["best_pointing"] <= 1.0
        for r in saved["heads"]:  # the strict reading (peak inside the region) never exceeds the tolerant one
            if r["modality"] == mod:
                assert 0.0 <= r["pointing_strict"] <= r["pointing"] <= 1.0
        assert saved["summary"][mod]["best_pointing_strict"] <= saved["summary"][mod]["best_pointing"]
        assert f"Strict pointing (the peak {'on the object' if mod == 'image' else 'inside the event'}" in text
        # by kind of referent: every phrase in one kind, and the best head's readings weighted by phrases are
        # its overall ones
        kinds, best = saved["by_referent"][mod], saved["summary"][mod]["best_head_strict"]
        assert set(kinds) <= ({"small", "large"} if mod == "image" else {"tone", "chirp", "noise", "clicks"})
        row = next(r for r in saved["heads"] if (r["modality"], r["layer"], r["head"]) == (mod, best["layer"], best["head"]))
        assert sum(v["phrases"] for v in kinds.values()) == row["phrases"]
        for key in ("pointing_strict", "pointing"):
            weighted = sum(v[f"best_head_{key}"] * v["phrases"] for v in kinds.values()) / row["phrases"]
            assert weighted == pytest.approx(row[key], abs=1e-9), key
        assert all(v["best_for_kind_pointing_strict"] >= v["best_head_pointing_strict"] for v in kinds.values())
        assert f"By {'object size' if mod == 'image' else 'event kind'}: the best head by strict pointing" in text
    # every kind of negative on every scene that allows it, kinds short of min_pairs on further scenes;
    # true captions scored as a match, by event count
    from collections import Counter

    from multimodal.data.pool import split_seeds
    from multimodal.data.scenes import CHANGE_TYPES, REPEAT, change_kinds

    scenes = [generate_scene(s) for s in split_seeds("test", 60, 0)]  # the pool: up to 10x the scenes asked

    def expect(kinds):  # batch_size 4: each further batch counts only the kinds still short
        count, start = Counter(k for s in scenes[:6] for k in change_kinds(s, repeat=True) if k in kinds), 6
        while start < len(scenes) and (short := [k for k in kinds if count[k] < 4]):
            count.update(k for s in scenes[start:start + 4] for k in change_kinds(s, repeat=True) if k in short)
            start += 4
        return count, start

    (seven, scanned), (repeats, scanned_repeat) = expect(CHANGE_TYPES), expect((REPEAT,))
    assert scanned > 6  # six scenes allow fewer than 4 order (or direction) negatives
    assert saved["every_kind_scenes"] == max(scanned, scanned_repeat)
    assert {k: v["pairs"] for k, v in saved["matching_every_kind"].items()} == {**seven, **repeats}
    assert all(v["pairs"] >= 4 for v in saved["matching_every_kind"].values()) and REPEAT in repeats
    assert "repeat: one event phrase of a two-event caption" in text
    scenes = scenes[:6]
    events = [sum(p["target"] == "event" for p in s.phrases) for s in scenes]
    assert saved["true_captions"]["all"]["captions"] == 6
    for n in set(events):
        assert saved["true_captions"][f"{n} event{'s' if n != 1 else ''}"]["captions"] == events.count(n)
    assert "## Every kind of negative" in text and "## True captions scored as a match" in text
    # the model card quotes eval's own figures: the per-phrase energy gain (as eval.md) and the ratio of means
    card = model_card(tmp_path / "run")
    for mod in ("image", "audio"):
        s = saved["summary"][mod]
        section = card.split(f"### {mod} grounding")[1].split("###")[0]
        assert f"**{s['mean_energy_gain']:.3f}**" in section, mod
        ratio = s["mean_energy"] / saved["baselines"][mod]["uniform"]["mean_energy"]
        assert f"the ratio of the means is {ratio:.2f} x" in section, mod
        # every source's per-phrase gain beside its energy: the uniform map's is 1 by construction (its energy
        # in a region is the region's share), and the card's table shows each source's as eval.md does
        base = saved["baselines"][mod]
        assert base["uniform"]["mean_energy_gain"] == pytest.approx(1.0, abs=1e-6), mod
        assert base["region"]["mean_energy_gain"] > 1.0, mod
        for source in ("uniform", "region"):
            assert f"{base[source]['mean_energy_gain']:.2f}x |" in section, (mod, source)
        assert f"| {base['region']['mean_energy_gain']:.2f}x |" in text.split(f"## {mod} grounding")[1]
        # per layer: recomputed here from the per-head rows, and the card's and eval.md's tables show it
        heads = [r for r in saved["heads"] if r["modality"] == mod]
        layers = [r for r in saved["layers"] if r["modality"] == mod]
        assert [r["layer"] for r in layers] == sorted({r["layer"] for r in heads})
        for r in layers:
            mine = [h for h in heads if h["layer"] == r["layer"]]
            best = max(mine, key=lambda h: h["pointing_strict"])
            assert (r["heads"], r["best_head_strict"], r["best_pointing_strict"]) == (
                len(mine), best["head"], best["pointing_strict"])
            assert r["best_pointing"] == max(h["pointing"] for h in mine)
            for key in ("pointing_strict", "pointing", "energy_gain"):
                assert r[f"mean_{key}"] == pytest.approx(sum(h[key] for h in mine) / len(mine)), key
            row = (f"| {r['layer']} | H{r['best_head_strict']} | {r['best_pointing_strict']:.3f} | "
                   f"{r['best_pointing']:.3f} | {r['mean_pointing_strict']:.3f} | {r['mean_pointing']:.3f} | "
                   f"{r['mean_energy_gain']:.2f}x |")
            assert row in section and row in text.split(f"## {mod} grounding")[1], (mod, r["layer"])
        for kind, v in saved["by_referent"][mod].items():  # by object size / event kind: the card's as eval.md's
            row = f"| {kind} | {v['phrases']} | {v['best_head_pointing_strict']:.3f} | {v['best_head_pointing']:.3f} | "
            assert row in section and row in text.split(f"## {mod} grounding")[1], (mod, kind)


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


def test_hard_contrastive_term_prefers_the_candidate_that_matches_its_scene():
    """Hand-computed: identity projections, 2 scenes x 2 candidates, one-hot tokens in 4 dims.

    Scene b's image keys are e(2b), e(2b+1). A matching caption's tokens are those keys (best
    cosine 1 each); the other caption's single token is -e0, whose best cosine is 0 (an
    orthogonal key) in either scene. At temperature 0.1 the hard term over [first, second] is
    log(1 + e^-10) when the matching caption comes first, and 10 + log(1 + e^-10) when it comes
    second. The in-batch term only sees the first caption of each scene, so it is unchanged by
    hard_weight and is subtracted out.
    """
    model = build_model(smoke(**{"fusion.dim": 4}), ("text", "image"))
    for m in ("text", "image"):
        model.fusion.input_proj[m] = torch.nn.Identity()
    e = torch.eye(4)
    keys = torch.stack([e[0:2], e[2:4]])  # (B=2, 2 keys, 4)
    image = ModalityTokens(keys, torch.ones(2, 2, dtype=torch.bool), "image",  # once per scene
                           torch.zeros(2, 2, dtype=torch.bool), None)
    mismatch = torch.stack([-e[0], torch.zeros(4)])  # one content token, one padding row
    one_token = torch.tensor([True, False])

    def loss(matching_first: bool, hard_weight: float) -> float:
        rows, masks = [], []
        for b in range(2):
            pair = [(keys[b], torch.tensor([True, True])), (mismatch, one_token)]
            for tokens, mask in (pair if matching_first else pair[::-1]):
                rows.append(tokens)
                masks.append(mask)
        text = ModalityTokens(torch.stack(rows), torch.stack(masks), "text", torch.zeros(4, 2, dtype=torch.bool), None)
        with torch.no_grad():
            return float(contrastive_loss(model, {"text": text, "image": image}, 2, 0.1, hard_weight))

    small = math.log1p(math.exp(-10))
    assert loss(True, 1.0) - loss(True, 0.0) == pytest.approx(small, abs=1e-5)
    assert loss(False, 1.0) - loss(False, 0.0) == pytest.approx(10 + small, abs=1e-4)
    assert loss(False, 2.0) - loss(False, 0.0) == pytest.approx(2 * (10 + small), abs=1e-4)


def test_contrastive_term_per_modality_reaches_the_modality_that_loses_every_max():
    """2 scenes, identity projections, 4 dims. Caption b's tokens are e(2b), e(2b+1); scene b's audio
    keys are the same vectors (cosine 1, and 0 with the other caption) and its image keys
    e(2b) + e(2b+1) - 0.1 (the other scene's two), normalised (cosine 1 / sqrt 2.02 = 0.704, and
    -0.070 with the other caption). One max over both modalities picks audio for every token, in every
    pair, so the image keys get no gradient; per modality the image term has its own max, and the value is the mean of the
    image-only and the audio-only terms."""
    model = build_model(smoke(**{"fusion.dim": 4}), ("text", "image", "audio"))
    for m in ("text", "image", "audio"):
        model.fusion.input_proj[m] = torch.nn.Identity()
    e = torch.eye(4)
    words = torch.stack([e[0:2], e[2:4]])  # (B=2, 2 tokens, 4)
    no = torch.zeros(2, 2, dtype=torch.bool)
    text = ModalityTokens(words, torch.ones(2, 2, dtype=torch.bool), "text", no, None)
    audio = ModalityTokens(words.clone(), torch.ones(2, 2, dtype=torch.bool), "audio", no, None)

    def image() -> ModalityTokens:
        keys = torch.stack([e[0] + e[1] - 0.1 * (e[2] + e[3]), e[2] + e[3] - 0.1 * (e[0] + e[1])])
        keys = keys[:, None].repeat(1, 2, 1) / math.sqrt(2.02)
        return ModalityTokens(keys.requires_grad_(), torch.ones(2, 2, dtype=torch.bool), "image", no, None)

    def run(per_modality: bool, **tokens) -> tuple[float, float]:
        img = tokens.get("image")
        loss = contrastive_loss(model, {"text": text, **tokens}, 1, 1.0, per_modality=per_modality)
        grad = 0.0
        if img is not None:
            loss.backward()
            grad = float(img.tokens.grad.abs().sum())
        return float(loss), grad

    joint, joint_grad = run(False, image=image(), audio=audio)
    both, both_grad = run(True, image=image(), audio=audio)
    image_only, _ = run(False, image=image())
    audio_only, _ = run(False, audio=audio)
    assert joint_grad == 0.0 and both_grad > 0.1
    assert joint == pytest.approx(audio_only, abs=1e-6)  # every max went to audio
    assert both == pytest.approx(0.5 * (image_only + audio_only), abs=1e-6)
    # audio: similarity 1 to its own caption, 0 to the other; image: 0.704 and -0.070 (temperature 1)
    assert audio_only == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert image_only == pytest.approx(math.log1p(math.exp(-1.1 / math.sqrt(2.02))), abs=1e-6)


def test_repeat_negatives_are_drawn_only_when_asked_and_leave_the_other_draws_alone():
    """repeat_negatives: "X then X" negatives join the hard negatives of two-event captions; off (the
    control, every study), the draws are exactly those of before."""
    from multimodal.data.pool import ScenePool
    from multimodal.data.scenes import CHANGE_TYPES, REPEAT, SceneConfig, hard_negative
    from multimodal.train.objective import candidate_captions

    pool = ScenePool.build(list(range(40)), SceneConfig())
    idx = list(range(40))
    kinds = {}
    for repeat in (False, True):
        tc = smoke(hard_negatives=3, easy_negatives=0, repeat_negatives=repeat)
        captions, kinds[repeat], _ = candidate_captions(pool, idx, tc, np.random.default_rng(0))
        if not repeat:  # exactly the plain draws
            rng, plain = np.random.default_rng(0), []
            for i in idx:
                plain += [pool.scenes[i].caption] + [hard_negative(pool.scenes[i], rng)[0] for _ in range(3)]
            assert captions == plain
    assert REPEAT not in kinds[False] and set(kinds[False]) <= set(CHANGE_TYPES)
    assert kinds[True].count(REPEAT) >= 5
    assert load_config("default").repeat_negatives and not load_config("local").repeat_negatives


def test_negative_mining_tracks_errors_per_kind_and_weights_by_them():
    mining = NegativeMining(1.0)
    assert mining.weights() == {}  # nothing seen yet: every kind weighs 1 in hard_negative
    # 2 scenes x [true, hard, hard, easy]: scene 0 gets its colour negative wrong (tie counts as wrong)
    scores = torch.tensor([[1.0, 1.0, 0.0, -1.0], [2.0, 0.0, 3.0, 0.0]])
    mining.update(scores, ["colour", "shape", None, "shape", "pitch", None])
    assert mining.error["colour"] == pytest.approx(0.98 * 0.5 + 0.02)
    assert mining.error["shape"] == pytest.approx(0.98 * (0.98 * 0.5))  # right twice
    assert mining.error["pitch"] == pytest.approx(0.98 * 0.5 + 0.02)
    w = mining.weights()
    assert w["colour"] == pytest.approx(0.51 + 0.02) and w["shape"] == pytest.approx(0.98 ** 2 * 0.5 + 0.02)
    assert NegativeMining(0.0).weights() is None  # off: hard_negative draws uniformly, as before
    assert mining.value_weights() is None and mining.value_error == {}  # values off: not tallied


def test_mining_values_tallies_each_change_within_a_kind_and_draws_the_ones_got_wrong():
    """mining_values: each change (a star called a cross) has its own running error, starting from its kind's;
    a change not yet seen weighs as its kind, and the candidates of a training step draw the changes got
    wrong far more often."""
    from multimodal.data.pool import ScenePool
    from multimodal.data.scenes import CHANGE_TYPES, REPEAT, SceneConfig
    from multimodal.train.objective import candidate_captions

    mining = NegativeMining(2.0, values=True)
    mining.error["shape"] = 0.1
    scores = torch.tensor([[1.0, 2.0, 0.0, -1.0]])  # the first negative outscores the truth, the second does not
    mining.update(scores, ["shape", "shape", None], ["shape:star>cross", "shape:star>circle", None])
    assert mining.value_error["shape:star>cross"] == pytest.approx(0.98 * 0.1 + 0.02)
    assert mining.value_error["shape:star>circle"] == pytest.approx(0.98 * 0.1)
    weights = mining.value_weights()  # the kinds' weights too: those of their changes not yet seen
    assert weights["shape"] == mining.weights()["shape"]
    assert weights["shape:star>cross"] == pytest.approx((0.98 * 0.1 + 0.04) ** 2)
    mining.value_error = {"shape:star>cross": 1.0, "shape:star>circle": 0.0, "shape:star>square": 0.0,
                          "shape:star>triangle": 0.0, "shape:star>diamond": 0.0}
    mining.error = {**dict.fromkeys((*CHANGE_TYPES, REPEAT), 0.0), "shape": 1.0}  # nearly every negative a shape
    pool = ScenePool.build(list(range(300)), SceneConfig())
    stars = [i for i, s in enumerate(pool.scenes) if any(o["shape"] == "star" for o in s.objects)]
    tc = smoke(hard_negatives=3, easy_negatives=0)
    counts = {}
    for values in (False, True):
        mining.values = values
        _, kinds, keys = candidate_captions(pool, stars, tc, np.random.default_rng(0), mining)
        made = [k for k in keys if k.startswith("shape:star>")]
        counts[values] = sum(k == "shape:star>cross" for k in made) / max(1, len(made))
        assert len(made) >= 10 and [k.split(":")[0] for k in keys] == kinds
    assert counts[False] < 0.5 and counts[True] > 0.9, counts  # uniform: 1 in 5; mined: nearly all


def test_mining_that_counts_matches_also_counts_a_negative_ranked_below_the_truth_but_scored_a_match():
    """mining_counts = "match": a negative the app would show as "match" (logit > 0) is got wrong even when its
    scene's true caption outscores it; "rank" (the default) counts only the ranking."""
    scores = torch.tensor([[3.0, 1.0, -1.0, 4.0]])  # true, colour (below the truth but p > 0.5), shape, easy
    rank, match = NegativeMining(1.0), NegativeMining(1.0, counts="match")
    for mining in (rank, match):
        mining.update(scores, ["colour", "shape", None])
    assert rank.error["colour"] == pytest.approx(0.98 * 0.5) and match.error["colour"] == pytest.approx(0.98 * 0.5 + 0.02)
    assert rank.error["shape"] == match.error["shape"] == pytest.approx(0.98 * 0.5)  # below the truth and p < 0.5
    with pytest.raises(InputError, match="mining_counts"):
        smoke(mining_counts="sometimes")


def test_curriculum_trains_on_one_object_scenes_first_then_the_full_config(tmp_path, monkeypatch):
    import multimodal.train.loop as train_module

    seen = []  # per training step: the number of objects in each scene of the batch
    original = train_module.candidate_captions

    def recording(pool, idx, *args, **kwargs):
        seen.append({len(pool.scenes[i].objects) for i in idx})
        return original(pool, idx, *args, **kwargs)

    monkeypatch.setattr(train_module, "candidate_captions", recording)
    train(smoke(steps=5, curriculum_steps=3), tmp_path / "run", progress=False)
    assert seen[:3] == [{1}] * 3  # the default curriculum scene: one object
    assert all(min(s) >= 2 for s in seen[3:]) and len(seen) == 5  # then the default 2-3 objects

    seen.clear()  # resuming after the curriculum goes straight on with full scenes
    train(smoke(steps=7, curriculum_steps=3), tmp_path / "run", resume=True, progress=False)
    assert len(seen) == 2 and all(min(s) >= 2 for s in seen)

    # dotted keys and a TOML table change the curriculum's scenes on top of the one-object default
    tc = load_config("smoke", overrides={"curriculum_scene.max_objects": 2,
                                         "curriculum_scene.max_mentioned_objects": 2})
    assert dict(tc.curriculum_scene) == {"min_objects": 1, "max_objects": 2, "max_mentioned_objects": 2}
    with pytest.raises(InputError, match="curriculum_scene.*'objects'"):
        load_config("smoke", overrides={"curriculum_scene.objects": 2})
    with pytest.raises(InputError, match="curriculum_steps"):
        load_config("smoke", overrides={"curriculum_steps": -1})


def test_freeze_keeps_the_named_encoders_at_their_initial_weights(tmp_path):
    tc = smoke(steps=2, freeze="text")
    assert tc.freeze == ("text",)
    before = build_model(tc).state_dict()
    train(tc, tmp_path / "run", progress=False)
    after = MultimodalModel.from_pretrained(tmp_path / "run").state_dict()
    same = {k.split(".")[1]: torch.equal(before[k], after[k]) for k in before if k.startswith("encoders.")
            and before[k].is_floating_point() and "running" not in k and "batches" not in k}
    assert same["text"] is True and same["image"] is False and same["audio"] is False
    assert smoke(freeze_encoders=True).freeze == ("text", "image", "audio")  # the older switch: all of them
    with pytest.raises(InputError, match="freeze"):
        smoke(freeze=["video"])


def test_per_modality_encoder_learning_rates(tmp_path):
    """encoder_lr_scales overrides encoder_lr_scale per modality: at scale 0 the text encoder never moves."""
    tc = smoke(steps=2, encoder_lr_scales={"text": 0.0}, encoder_lr_scale=1.0)
    before = build_model(tc).state_dict()
    train(tc, tmp_path / "run", progress=False)
    after = MultimodalModel.from_pretrained(tmp_path / "run").state_dict()
    same = {k.split(".")[1]: torch.equal(before[k], after[k]) for k in before if k.startswith("encoders.")
            and before[k].is_floating_point() and "running" not in k and "batches" not in k}
    assert same == {"text": True, "image": False, "audio": False}
    for bad in ({"video": 0.1}, {"text": -1.0}):
        with pytest.raises(InputError, match="encoder_lr_scales"):
            smoke(encoder_lr_scales=bad)


def test_masked_word_loss_reads_the_masked_words_from_the_scene():
    from multimodal.train import masked_word_loss

    torch.manual_seed(0)
    tc = smoke(masked_word_weight=1.0, match="bilinear")  # the term reads words through the bilinear head
    model = build_model(tc)
    scenes = [generate_scene(s) for s in (1, 2)]
    captions = [c for s in scenes for c in (s.caption, "a red star")]  # 2 candidates per scene, true first
    image = model.encoders["image"].encode([s.image for s in scenes])
    tokens = {"image": image}  # once per scene, as score_candidates gives them
    loss = masked_word_loss(model, tokens, captions, 2, rate=0.3, rng=np.random.default_rng(0))
    assert loss.ndim == 0 and math.isfinite(float(loss)) and float(loss) > 0
    loss.backward()
    grads = [p.grad for p in model.encoders["image"].parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)  # the words are read from the image
    other = {"image": model.encoders["image"].encode([s.image[::-1] for s in scenes])}
    with torch.no_grad():  # same masked positions (same rng seed), another image: another loss
        flipped = masked_word_loss(model, other, captions, 2, rate=0.3, rng=np.random.default_rng(0))
    assert float(flipped) != pytest.approx(float(loss), abs=1e-6)
    with pytest.raises(InputError, match="bilinear"):
        smoke(masked_word_weight=1.0, match="mean")


def test_a_training_step_projects_each_scene_once_and_loses_nothing_by_it():
    """The loop's step (each scene's tokens once, its captions attending as one set) gives the loss,
    accuracy, draws and updated weights of the step that copied the scene per candidate. Plain SGD, so
    the weights move by the gradient itself (Adam's normalisation would blow rounding-level
    gradients of parameters the step barely touches up to a full learning-rate step)."""
    import copy

    from multimodal.data.pool import ScenePool, split_seeds
    from multimodal.train import parameter_groups
    from multimodal.train.config import scene_config
    from multimodal.train.loop import training_step

    tc = smoke(contrastive_hard_weight=0.5)
    pool = ScenePool.build(split_seeds("train", 8, 0), scene_config(tc))
    base = build_model(tc).train()
    results = {}
    for share in (True, False):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(parameter_groups(model, tc), lr=tc.lr)
        rng, mining = np.random.default_rng(0), NegativeMining(tc.negative_mining)
        torch.manual_seed(0)  # the same dropout draws
        loss, acc = training_step(model, opt, pool, [0, 1, 2, 3], tc, rng, mining, 1e-2, share_scene=share)
        results[share] = (loss, acc, rng.integers(1 << 30), dict(mining.error), model)
    (loss, acc, draw, error, shared), (loss_r, acc_r, draw_r, error_r, repeated) = results[True], results[False]
    assert loss == pytest.approx(loss_r, rel=1e-6) and acc == acc_r and draw == draw_r and error == error_r
    assert math.isfinite(loss) and loss > 0
    moved = max((p - q).abs().max().item() for p, q in zip(shared.parameters(), base.parameters()))
    differ = max((p - q).abs().max().item() for p, q in zip(shared.parameters(), repeated.parameters()))
    assert moved > 1e-4 and differ < 1e-3 * moved  # the step moved the weights, both ways alike


@pytest.mark.parametrize("pattern", ["itd,jkd->ijtk", "bptd,bkd->bptk"])
def test_best_cosine_gives_amax_over_the_keys_and_its_gradient(pattern):
    """The contrastive term's best-key cosine, found without autograd and recomputed for the winner,
    equals amax over the (masked) similarities in value and gradient."""
    from multimodal.train.objective import best_cosine

    g = torch.Generator().manual_seed(0)
    shape = (3, 5, 4) if pattern.startswith("itd") else (3, 2, 5, 4)
    t0 = torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)
    k0 = torch.nn.functional.normalize(torch.randn(3, 6, 4, generator=g), dim=-1)
    k_mask = torch.ones(3, 6, dtype=torch.bool)
    k_mask[1, 4:] = False
    for mask in (None, k_mask):
        t, k = t0.clone().requires_grad_(), k0.clone().requires_grad_()
        sim = torch.einsum(pattern, t, k)
        if mask is not None:
            view = [1, 3, 1, 6] if pattern.startswith("itd") else [3, 1, 1, 6]
            sim = sim.masked_fill(~mask.view(view), -2.0)
        want = sim.amax(-1)
        want.sum().backward()
        grads = t.grad, k.grad
        t, k = t0.clone().requires_grad_(), k0.clone().requires_grad_()
        got = best_cosine(t, k, mask, all_pairs=pattern.startswith("itd"))
        got.sum().backward()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch.testing.assert_close(t.grad, grads[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(k.grad, grads[1], rtol=0, atol=1e-6)


def test_best_threshold_maximises_balanced_accuracy_by_hand():
    from multimodal.train import best_threshold

    # positives 2, 3, 5; negatives 0, 1, 4: the best cut is between 1 and 2 (or 4 and 5): balanced 5/6.
    # Cuts 1.5 (accept 3/3, reject 2/3) and 4.5 (accept 1/3, reject 3/3): 1.5 is better (5/6 vs 2/3)
    t, ba = best_threshold(np.array([2.0, 3.0, 5.0]), np.array([0.0, 1.0, 4.0]))
    assert t == 1.5 and ba == pytest.approx(5 / 6)
    # separable, with unequal class sizes: of the candidates -4, -1.5, 0.5, 1.5, 2.25, 3.5 only the
    # midpoint 1.5 (between the highest negative 1 and the lowest positive 2) separates them all
    t, ba = best_threshold(np.array([2.0, 2.5]), np.array([-3.0, 0.0, 1.0, 1.0]))
    assert t == 1.5 and ba == 1.0
    # candidates -1, 0.5, 1.5, 2.5, 4 score 1/2, 3/4, 1/2, 3/4, 1/2: two tie at 3/4, and of an even
    # number of tied candidates the upper middle one is taken (index len // 2)
    t, ba = best_threshold(np.array([1.0, 3.0]), np.array([0.0, 2.0]))
    assert t == 2.5 and ba == pytest.approx(0.75)
    # three tied candidates: cuts 0.5, 3.5 and 6.5 each score 2/3 (accept 3, 2, 1 of 3; reject 1, 2, 3 of
    # 3), the others less: the middle one, 3.5
    t, ba = best_threshold(np.array([1.0, 4.0, 7.0]), np.array([0.0, 3.0, 6.0]))
    assert t == 3.5 and ba == pytest.approx(2 / 3)


def test_calibration_shifts_every_score_alike_and_reaches_its_balanced_accuracy(tmp_path):
    """calibrate_match_bias moves the match logit by one constant (the soft minimum commutes with it):
    rankings and maps stay, the shift is the chosen threshold, and after it p = 0.5 achieves the
    balanced accuracy it reports. A trained run ends calibrated and says so in its summary."""
    from multimodal.data.pool import ScenePool, split_seeds
    from multimodal.model import score_candidates
    from multimodal.train import calibrate_match_bias
    from multimodal.train.config import scene_config

    tc = smoke()
    pool = ScenePool.build(split_seeds("val", 12, 0), scene_config(tc))
    model = build_model(tc).eval()
    with torch.no_grad():  # a bias far off, as an untrained or prior-skewed model has
        model.match_head[-1].bias.fill_(-5.0)
    caps = [c for i in range(4) for c in (pool.scenes[i].caption, pool.scenes[(i + 1) % 4].caption)]
    with torch.no_grad():
        before, out_before = score_candidates(model, pool.batch(model, [0, 1, 2, 3]), caps, 2, return_maps=True)
    c = calibrate_match_bias(model, pool, seed=3, negatives=2, batch_size=5)
    assert c["scenes"] == 12 and c["negatives"] == 24
    with torch.no_grad():
        after, out_after = score_candidates(model, pool.batch(model, [0, 1, 2, 3]), caps, 2, return_maps=True)
    torch.testing.assert_close(after - before, torch.full_like(before, c["shift"]), atol=1e-4, rtol=0)
    for layer in out_before.fused.maps.layers:
        torch.testing.assert_close(out_after.fused.maps.weights[layer], out_before.fused.maps.weights[layer])
    assert c["balanced_accuracy_after"] >= c["balanced_accuracy_before"]
    assert c["balanced_accuracy_after"] == pytest.approx(
        (c["true_matched_after"] + c["negatives_rejected_after"]) / 2)
    again = calibrate_match_bias(model, pool, seed=3, negatives=2, batch_size=5)  # already calibrated: p = 0.5
    assert abs(again["shift"]) < 1e-3 and again["balanced_accuracy_before"] == pytest.approx(
        c["balanced_accuracy_after"])

    summary = train(smoke(steps=2), tmp_path / "run", progress=False)
    assert summary["calibration"]["scenes"] == 8
    saved = MultimodalModel.from_pretrained(tmp_path / "run")
    assert saved.meta["match_calibration"] == summary["calibration"]
    assert train(smoke(steps=2, calibrate=False), tmp_path / "off", progress=False)["calibration"] is None


def test_match_order_after_switches_the_order_items_on_once_training_is_done(tmp_path, capsys):
    """"after": trained without the order items, saved with them at their initial scale and bias;
    "train" (the default): on from step 0; both skipped, and said so, where the model cannot read order."""
    train(smoke(steps=2, match_order="after"), tmp_path / "after", progress=True)
    assert "event order switched on (match_order = after)" in capsys.readouterr().out
    train(smoke(steps=2, match_order="off"), tmp_path / "off", progress=False)
    after, off = MultimodalModel.from_pretrained(tmp_path / "after"), MultimodalModel.from_pretrained(tmp_path / "off")
    assert after.match_order and not off.match_order
    assert after.order_bias.item() == ORDER_BIAS_INIT
    assert torch.nn.functional.softplus(after.order_scale).item() == pytest.approx(ORDER_SCALE_INIT)
    for name, weight in off.state_dict().items():  # the same training: only the order items were added
        torch.testing.assert_close(after.state_dict()[name], weight, rtol=0, atol=0)
    assert build_model(smoke(match_order="train")).match_order
    for name, kw in (("latents", {"fusion.query": "latents"}), ("mean", {"match": "mean"})):
        for order in ("after", "train"):
            capsys.readouterr()
            train(smoke(steps=1, match_order=order, **kw), tmp_path / f"{name}-{order}", progress=False)
            assert f"note: match_order = {order} skipped" in capsys.readouterr().out
            assert not MultimodalModel.from_pretrained(tmp_path / f"{name}-{order}").match_order
    with pytest.raises(InputError, match="match_order"):
        smoke(match_order="sometimes")


def test_a_frozen_recipe_writes_out_every_field_and_is_what_the_shipped_default_was_trained_with():
    """Every frozen recipe pins every TrainConfig field a run does not choose for itself; `--preset
    default-2026-12-07-column` at the values assets/default was trained with, and `train --preset default` is
    that recipe. The defaults before it differ in the audio encoder only: `default-2026-12-07` (its layers
    attending one column either side) and `default-2026-12-03` (the studies' [base], 16x16 patches)."""
    from dataclasses import fields

    from multimodal.compare.study import NEUTRAL_KEYS
    from multimodal.inference import DEFAULT_CHECKPOINT
    from multimodal.train import PRESETS, TrainConfig
    from multimodal.train.config import RECIPES

    run_only = {"seed", "device", "workers", "snapshots", "manifest"}
    for path in RECIPES.glob("*.toml"):
        assert set(PRESETS[path.stem]) == {f.name for f in fields(TrainConfig)} - run_only, path.name
    def as_saved(preset):  # a preset's config as config.json holds it (tuples as lists)
        return json.loads(json.dumps(load_config(preset).to_dict()))

    saved = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())["meta"]["train_config"]
    frozen = as_saved("default-2026-12-07-column")
    added = set(frozen) - set(saved)  # fields added since: at the value that reproduces the shipped training
    assert added <= set(NEUTRAL_KEYS) and all(frozen[k] == NEUTRAL_KEYS[k] for k in added), added
    assert {k: v for k, v in frozen.items() if k not in run_only | added} == {
        k: v for k, v in saved.items() if k not in run_only}
    assert as_saved("default") == frozen
    for preset, audio in (("default-2026-12-07", "ast-window-mel40-scenes"),
                          ("default-2026-12-03", "ast-window-scenes")):
        before = as_saved(preset)
        assert {k for k in frozen if frozen[k] != before[k]} == {"audio_encoder"}, preset
        assert (before["audio_encoder"], frozen["audio_encoder"]) == (audio, "ast-column-mel40-scenes")
    with pytest.raises(InputError, match="default-2026-12-03"):  # listed where an unknown preset is refused
        load_config("default-2026-12-02")


@pytest.mark.parametrize("captions, absent", [("audio", {"colour", "shape", "size"}),
                                              ("image", {"pitch", "direction", "event_kind", "order", "repeat"})])
def test_eval_of_captions_about_one_modality_leaves_out_the_kinds_no_scene_allows(tmp_path, captions, absent):
    """The task-variety study's runs: captions about the sounds alone allow no colour, shape or size negative.
    Such a kind has no pairs; it is listed as absent, not divided 0 / 0 (a ZeroDivisionError ended every such
    run's analysis)."""
    from multimodal.train.config import scene_config

    tc = smoke(steps=1, captions=captions)
    train(tc, tmp_path / "run", progress=False)
    model = MultimodalModel.from_pretrained(tmp_path / "run")
    result = evaluate(model, scenes=4, seed=0, scene_cfg=scene_config(tc), baselines=False, progress=False,
                      min_pairs=2, batch_size=4)
    assert set(result["every_kind_absent"]) == absent
    assert not absent & set(result["matching_every_kind"])
    assert all(v["pairs"] >= 2 for v in result["matching_every_kind"].values())
    _, md_path = write_report(result, tmp_path / "run")
    assert "No scene of this config allows" in open(md_path).read()


def test_curriculum_every_meets_each_scene_with_every_change_of_its_kinds_in_a_second_term(tmp_path, monkeypatch):
    """curriculum_every: in the curriculum each scene is also scored against every change of the kinds
    named (a star against the cross, circle, ... it is not), padded per batch; the second matching term
    leaves the padding out, and the draws, the mining, the reported share and loss are those of the step
    without it."""
    import multimodal.train.loop as train_module
    from multimodal.data.pool import ScenePool, split_seeds
    from multimodal.data.scenes import every_negative
    from multimodal.train import parameter_groups
    from multimodal.train.config import curriculum_scene_config, scene_config
    from multimodal.train.objective import every_captions, matching_loss

    tc = smoke(curriculum_every="shape")
    assert tc.curriculum_every == ("shape",)
    with pytest.raises(InputError, match="curriculum_every=\\['hue'\\]: name kinds of change"):
        smoke(curriculum_every=["hue"])
    curriculum = ScenePool.build(split_seeds("curriculum", 6, 0), curriculum_scene_config(tc))
    captions, valid = every_captions(curriculum, [0, 1, 2], ("shape",))
    assert valid.shape == (3, 5) and bool(valid.all())  # one object: 5 other shapes each
    assert captions == [c for i in range(3) for c, _, _ in every_negative(curriculum.scenes[i], "shape")]

    full = ScenePool.build(split_seeds("train", 40, 0), scene_config(tc))  # order: only two-event captions
    one = next(i for i, s in enumerate(full.scenes) if not every_negative(s, "order"))
    two = next(i for i, s in enumerate(full.scenes) if every_negative(s, "order"))
    captions, valid = every_captions(full, [one, two], ("order",))
    assert valid.tolist() == [[False], [True]] and captions[0] == full.scenes[one].caption
    scores = torch.randn(2, 2)
    mask = torch.tensor([[True, False], [True, True]])
    padded = scores.clone()
    padded[0, 1] = 50.0  # what a padded slot scores does not count
    assert matching_loss(scores, mask).item() == pytest.approx(matching_loss(padded, mask).item())
    assert matching_loss(scores, torch.ones(2, 2, dtype=torch.bool)).item() == pytest.approx(
        matching_loss(scores).item())

    per_scene_seen = []
    original = train_module.score_candidates

    def recording(model, batch, captions, per_scene, **kwargs):
        per_scene_seen.append(per_scene)
        return original(model, batch, captions, per_scene, **kwargs)

    monkeypatch.setattr(train_module, "score_candidates", recording)
    base = build_model(tc).eval()  # no dropout: its draws would differ with the number of captions
    results, models = {}, {}
    for every in ((), ("shape",)):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(parameter_groups(model, tc), lr=tc.lr)
        rng, mining = np.random.default_rng(0), NegativeMining(tc.negative_mining)
        loss, acc = train_module.training_step(model, opt, curriculum, [0, 1, 2, 3], tc, rng, mining, 1e-2,
                                               every=every)
        results[every], models[every] = (loss, acc, rng.integers(1 << 30), dict(mining.error)), model
    per_scene = 1 + tc.hard_negatives + tc.easy_negatives
    assert per_scene_seen == [per_scene, per_scene + 5]
    (loss, acc, draw, error), (loss_e, acc_e, draw_e, error_e) = results[()], results[("shape",)]
    assert (acc_e, draw_e, error_e) == (acc, draw, error)
    assert loss_e == pytest.approx(loss, rel=1e-4)  # the reported loss (the stall check's) leaves the term out
    moved = {every: max((p - q).abs().max().item() for p, q in zip(m.parameters(), base.parameters()))
             for every, m in models.items()}
    differ = max((p - q).abs().max().item() for p, q in zip(models[()].parameters(), models[("shape",)].parameters()))
    assert differ > 0.1 * moved[()]  # but the step trained on it

    text = base.encoders["text"]  # the other terms get the drawn captions' rows, geometry included
    encoded = text(text.preprocess(["a red star", "a blue cross with a low tone", "a green circle"]))
    picked = encoded.select([2, 0])
    assert picked.geometry.texts == ["a green circle", "a red star"]
    assert torch.equal(picked.tokens, encoded.tokens[[2, 0]]) and torch.equal(picked.mask, encoded.mask[[2, 0]])

    per_scene_seen.clear()  # the loop asks for it in the curriculum only
    train(smoke(steps=5, curriculum_steps=3, curriculum_every=["shape"]), tmp_path / "run", progress=False)
    assert per_scene_seen == [per_scene + 5] * 3 + [per_scene] * 2
