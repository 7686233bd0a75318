"""The compare command on tiny studies: report files, skipping, determinism, refusals, workers."""

import copy
import json
import os
import re
import shutil
import sys
import time

import pytest

from multimodal.cli import main
from multimodal.compare.report import factor_conclusions
from multimodal.compare.runner import finished_results, reuse_index, run_output, usable_cores
from multimodal.compare.study import describe_runs
from multimodal.compare.summary import pointing_best_strict
from multimodal.compare import (DONE, load_study, plan_runs, run_study, shipped_studies, study_from_dict,
                                without_timing, write_report)
from multimodal.types import InputError

TINY_BASE = {"preset": "smoke", "steps": 2, "fusion.dim": 32, "fusion.heads": 2, "fusion.layers": 1,
             "contrastive_per_modality": False}  # as STUDY_TOML (its comment says why)


def tiny_study(**over):
    d = {"name": "tiny", "question": "Do text queries and latent queries differ?", "seeds": [0],
         "eval_scenes": 4, "analysis_scenes": 4, "shapley_permutations": 2, "snapshots": [0, 1, 2],
         "base": dict(TINY_BASE), "grid": {"fusion.query": ["text", "latents"]},
         "grounded_pointing": 0.0}  # 2-step models do not ground: keep every run in the conclusions
    d.update(over)
    return d


STUDY_TOML = """
name = "tiny"
question = "Do text queries and latent queries differ?"
seeds = [0]
eval_scenes = 4
analysis_scenes = 4
shapley_permutations = 2
snapshots = [0, 1, 2]

[base]
preset = "smoke"
steps = 2
fusion.dim = 32          # bare dotted keys work as well as quoted ones
"fusion.heads" = 2
"fusion.layers" = 1
# the joint contrastive term: after 2 steps under the per-modality one, a validation scene's score sits
# within float noise of the threshold, and one thread and two (the engines' test below) disagree on it
contrastive_per_modality = false

[grid]
"fusion.query" = ["text", "latents"]
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny study run once through the CLI (2 runs): (study file, report folder)."""
    root = tmp_path_factory.mktemp("compare")
    toml = root / "tiny.toml"
    toml.write_text(STUDY_TOML)
    out = root / "report"
    assert main(["compare", str(toml), "--out", str(out), "--quiet"]) == 0
    return toml, out


def done(out, run_id):
    return json.loads((out / "runs" / run_id / DONE).read_text())


def test_the_compute_line_says_which_reused_trainings_are_also_copied_or_carried():
    """A run copied from a study that itself reused a training is counted under both: the line says so."""
    from multimodal.compare.report import compute_line

    def run(**extra):
        return {"timing": {"train_s": 60.0, "eval_s": 0.0, "analysis_s": 0.0, "threads": 1}, "config": {},
                "train": {"steps": 10, "loaded": extra.pop("loaded", False)}, **extra}

    runs = [run(loaded=True, reused_from="a"), run(loaded=True, reused_from="b"), run(loaded=True, carried_from="c"),
            run(loaded=True), run(carried_from="d")]
    line = compute_line(runs)
    assert ("; 4 run(s) reused an earlier training of the same config (of these, 2 among the copied runs and 1 "
            "among the carried-over runs below); 2 run(s) copied from another study's") in line, line
    assert "; 2 run(s) computed earlier by this study and carried over" in line
    assert "(of these" not in compute_line([run(loaded=True), run()])


def test_report_files_and_contents(finished):
    _, out = finished
    text = (out / "report.md").read_text()
    for part in ("# Study: tiny", "## Results per grid point", "## Conclusions", "## Per-head tables",
                 "fusion.query", "No grounding for query = latents", "## Training snapshots", "## Grounding per run"):
        assert part in text, part
    # the compute line adds up every run's training, evaluation and analysis, snapshots included
    from multimodal.compare.report import run_seconds

    runs = json.loads((out / "results.json").read_text())["runs"]
    total = sum(run_seconds(r) for r in runs)
    t = runs[0]["timing"]
    assert run_seconds(runs[0]) > t["train_s"] + t["eval_s"] + t["analysis_s"]  # snapshots 0 and 1 count too
    assert f"**Compute.** {total / 60:.1f} min of run time in all" in text
    assert f"with {t['threads']} torch thread(s) per run on cpu" in text
    assert (out / "plots" / "summary.png").stat().st_size > 0
    assert (out / "plots" / "training_dynamics.png").stat().st_size > 0
    for run_id in ("fusion.query=text,seed=0", "fusion.query=latents,seed=0"):
        assert (out / "plots" / "heads" / f"{run_id}.png").stat().st_size > 0
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("run_id,group,seed,fusion.query")
    data = json.loads((out / "results.json").read_text())
    assert [r["run_id"] for r in data["runs"]] == ["fusion.query=text,seed=0", "fusion.query=latents,seed=0"]

    text_run, latent_run = data["runs"]
    assert text_run["grounding"] is not None and latent_run["grounding"] is None
    assert latent_run["summary"]["pointing_image_best"] is None
    assert 0.0 <= text_run["summary"]["matching_accuracy"] <= 1.0
    head = text_run["heads"][0]
    for key in ("entropy", "confidence", "share_image", "share_audio", "spread_px", "spread_s", "pointing_image",
                "pointing_audio", "ablation", "gradient", "shapley", "shapley_stderr"):
        assert key in head, key
    assert len(text_run["heads"]) == 2  # 1 layer x 2 heads
    assert [s["step"] for s in text_run["snapshots"]] == [0, 1, 2]
    assert (out / "runs" / "fusion.query=text,seed=0" / "model" / "snapshots" / "step_1" / "config.json").is_file()


def test_rerun_skips_finished_runs(finished):
    toml, out = finished
    ids = ["fusion.query=text,seed=0", "fusion.query=latents,seed=0"]
    stamps = {i: (out / "runs" / i / DONE).stat().st_mtime_ns for i in ids}
    result = run_study(toml, out, progress=False)
    assert result["skipped"] == ids and result["ran"] == [] and not result["failed"]
    # untouched: neither trained nor evaluated again (a wall-clock bound here failed on a loaded CPU)
    assert {i: (out / "runs" / i / DONE).stat().st_mtime_ns for i in ids} == stamps


def test_same_config_and_seed_give_the_same_numbers(finished, tmp_path):
    _, out = finished
    study = study_from_dict(tiny_study(grid={"fusion.query": ["text"]}))
    again = run_study(study, tmp_path / "again", progress=False, report=False)
    assert again["ran"] == ["fusion.query=text,seed=0"]
    assert without_timing(again["runs"][0]) == without_timing(done(out, "fusion.query=text,seed=0"))


def test_an_interrupted_run_goes_on_from_its_checkpoint_and_ends_as_one_never_interrupted(tmp_path, monkeypatch,
                                                                                           capsys):
    """A run whose training died after its step-2 checkpoint (4 steps) resumes there on the next `compare`,
    not from step 0, and its results equal those of a run never interrupted."""
    from multimodal.train import loop

    study = study_from_dict(tiny_study(name="cut", base={**TINY_BASE, "steps": 4, "checkpoint_every": 2},
                                       grid={"fusion.query": ["text"]}, snapshots=[]))
    whole = run_study(study, tmp_path / "whole", progress=False, report=False)
    (run_id,) = [r["run_id"] for r in whole["runs"]]
    real, calls = loop.candidate_captions, []

    def dies_at_step_3(*args, **kwargs):  # the negatives of each training step are drawn here
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("worker killed at step 3")
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(loop, "candidate_captions", dies_at_step_3)
        cut = run_study(study, tmp_path / "cut", progress=False, report=False)
    assert list(cut["failed"]) == [run_id] and "worker killed at step 3" in cut["failed"][run_id]
    model_dir = tmp_path / "cut" / "runs" / run_id / "model"
    assert json.loads((model_dir / "train_state.json").read_text())["step"] == 2
    capsys.readouterr()
    again = run_study(study, tmp_path / "cut", progress=False, report=False)
    printed = capsys.readouterr().out
    assert f"[{run_id}] run {run_id}: its training stopped after step 2 of 4; going on from there" in printed
    assert f"[{run_id}] resuming from step 2" in printed  # each line the run prints carries its id
    log = (tmp_path / "cut" / "runs" / run_id / "log.txt").read_text()  # and goes to its own log, both tries
    assert log.index("step 3: val pairwise accuracy") > log.index("resuming from step 2")
    assert "going on from there" in log and not any(line.startswith("[") for line in log.splitlines())
    assert again["ran"] == [run_id] and not again["failed"]
    assert not (tmp_path / "cut" / "runs" / run_id / "error.txt").exists()
    assert without_timing(again["runs"][0]) == without_timing(whole["runs"][0])
    # a checkpoint of another config is not resumed: that run starts clean
    other = study_from_dict(tiny_study(name="cut", base={**TINY_BASE, "steps": 4, "checkpoint_every": 2, "lr": 0.002},
                                       grid={"fusion.query": ["text"]}, snapshots=[]))
    with monkeypatch.context() as m:
        calls.clear()
        m.setattr(loop, "candidate_captions", dies_at_step_3)
        run_study(other, tmp_path / "other", progress=False, report=False)
    shutil.copytree(tmp_path / "other" / "runs", tmp_path / "mixed" / "runs")
    capsys.readouterr()
    mixed = run_study(study, tmp_path / "mixed", progress=False, report=False)
    assert "going on from there" not in capsys.readouterr().out and not mixed["failed"]
    assert without_timing(mixed["runs"][0]) == without_timing(whole["runs"][0])
    # a damaged checkpoint: said, then trained again from step 0
    with monkeypatch.context() as m:
        calls.clear()
        m.setattr(loop, "candidate_captions", dies_at_step_3)
        run_study(study, tmp_path / "damaged", progress=False, report=False)
    state = tmp_path / "damaged" / "runs" / run_id / "model" / "train_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    damaged = run_study(study, tmp_path / "damaged", progress=False, report=False)
    said = capsys.readouterr().out
    assert "cannot go on from its checkpoint" in said and "is damaged" in said and not damaged["failed"]
    assert "--overwrite" not in said  # train's advice to a user, not what a study does
    assert without_timing(damaged["runs"][0]) == without_timing(whole["runs"][0])


def test_a_folder_holding_other_work_is_refused_and_left_as_it_was(finished, tmp_path, capsys):
    """--out naming another study's results, or a folder of files no study writes: refused before anything
    is written, by run_study and by --report-only alike."""
    toml, out = finished
    other = tmp_path / "other.toml"
    other.write_text(STUDY_TOML.replace('name = "tiny"', 'name = "tiny2"'))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra in ([], ["--report-only"]):
        assert main(["compare", str(other), "--out", str(out), *extra]) == 2
        assert "holds the results of study 'tiny': choose another --out for study 'tiny2'" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(InputError, match=r"holds files that are not a study's output \(notes.txt\)"):
        run_study(load_study(toml), mine, progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert main(["compare", str(toml), "--out", str(out), "--report-only"]) == 0  # its own folder: fine


def test_changed_settings_rerun_the_analysis_but_reuse_the_training(finished, tmp_path):
    _, out = finished
    run_id = "fusion.query=latents,seed=0"
    shutil.copytree(out / "runs" / run_id, tmp_path / "runs" / run_id)
    changed = study_from_dict(tiny_study(grid={"fusion.query": ["latents"]}, shapley_permutations=3))
    result = run_study(changed, tmp_path, progress=False, report=False)
    assert result["ran"] == [run_id]  # stale: the study's settings changed, so it is not skipped
    again = result["runs"][0]
    assert again["train"]["loaded"] is True  # the same training config: the checkpoint is reused
    before = done(out, run_id)
    assert again["matching"] == before["matching"] and again["train"]["history"] == before["train"]["history"]
    assert again["fingerprint"] != before["fingerprint"]


@pytest.mark.parametrize("change, named", [
    ({"grid": {"fusion.hedas": [2, 4]}}, "fusion.hedas"),
    ({"grid": {"stepz": [2]}}, "stepz"),
    ({"grid": {"fusion.attention": ["softmax", "sparsest"]}}, "attention"),
    ({"grid": {"fusion.heads": [2, 3]}}, "fusion.heads=3"),
    ({"grid": {"steps": ["two"]}}, "steps"),
    ({"grid": {"steps": 2}}, "steps"),
    ({"base": {**TINY_BASE, "lr": "fast"}}, "lr"),
    ({"base": {**TINY_BASE, "preset": "huge"}}, "preset"),
    ({"seedz": [0]}, "seedz"),
    ({"eval_scenes": 0}, "eval_scenes"),
    ({"snapshots": [5]}, "snapshots"),
    ({"grid": {"seed": [0, 1]}}, "seed"),
])
def test_bad_keys_and_values_are_refused_before_anything_runs(tmp_path, change, named):
    out = tmp_path / "report"
    with pytest.raises(InputError, match=named.replace(".", r"\.")):
        run_study(study_from_dict(tiny_study(**change)), out, progress=False)
    assert not out.exists()


def test_bad_study_file_is_refused_by_the_cli(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(STUDY_TOML.replace('"fusion.query" = ["text", "latents"]', '"fusion.qurey" = ["text"]'))
    assert main(["compare", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "fusion.qurey" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_runs_and_runs_nothing(finished, tmp_path, capsys):
    toml, out = finished
    assert main(["compare", str(toml), "--out", str(tmp_path / "fresh"), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "[pending] fusion.query=text,seed=0" in listing and "[pending] fusion.query=latents,seed=0" in listing
    assert not (tmp_path / "fresh").exists()
    assert main(["compare", str(toml), "--out", str(out), "--dry-run"]) == 0
    assert "[done   ] fusion.query=text,seed=0" in capsys.readouterr().out


def test_dry_run_says_where_each_started_run_stands(finished, tmp_path, capsys):
    """Under a run started in OUT the listing gives its checkpoint (a finished training waiting for its
    analysis, or the step a re-run goes on from), its error and its log's last line with that line's age."""
    toml, out = finished
    watch = tmp_path / "watch"
    for run_id in ("fusion.query=text,seed=0", "fusion.query=latents,seed=0"):
        shutil.copytree(out / "runs" / run_id / "model", watch / "runs" / run_id / "model")
    trained = watch / "runs" / "fusion.query=text,seed=0"
    (trained / "log.txt").write_text("step 2: val pairwise accuracy 0.500\n\n")
    cut = watch / "runs" / "fusion.query=latents,seed=0"
    (cut / "model" / "train_summary.json").unlink()  # the training stopped after its step-1 checkpoint
    state = json.loads((cut / "model" / "train_state.json").read_text())
    (cut / "model" / "train_state.json").write_text(json.dumps({**state, "step": 1}))
    (cut / "error.txt").write_text("Traceback (most recent call last):\nRuntimeError: worker killed at step 2\n")
    (cut / "log.txt").write_text("step 1/2: loss 4.000, train acc 0.500; 3.00 s a step, about 0 min to go\n")
    os.utime(cut / "log.txt", (time.time() - 3 * 3600, time.time() - 3 * 3600))
    assert main(["compare", str(toml), "--out", str(watch), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    text, latents = listing.split("[pending] fusion.query=text,seed=0")[1].split("[failed ] fusion.query=latents")
    assert "trained; its evaluation and analysis are still to run" in text
    assert re.search(r"log, \d+ s ago: step 2: val pairwise accuracy 0.500\n", text)
    assert "checkpoint at step 1 of 2: a re-run goes on from there" in latents
    assert "failed: RuntimeError: worker killed at step 2" in latents
    assert "log, 3.0 h ago: step 1/2: loss 4.000" in latents
    assert "to run: 2 (1 to go on from a checkpoint, 1 trained, to analyse); done: 0" in listing
    shutil.rmtree(cut / "model")  # nothing of this config left to go on from
    assert main(["compare", str(toml), "--out", str(watch), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "nothing to go on from (no checkpoint of this config yet): a re-run starts at step 0" in listing
    assert "to run: 2 (1 trained, to analyse); done: 0" in listing
    assert not (cut / "model").exists() and (cut / "error.txt").is_file()  # the listing changes nothing


def test_help_and_shipped_studies_are_valid(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    assert "--workers" in capsys.readouterr().out
    names = shipped_studies()
    assert {"size", "training_dynamics", "attention_kind", "positional", "queries"} <= set(names)
    for name in names:
        study = load_study(name)
        runs = plan_runs(study, check_models=False)
        assert len(study.seeds) == 3 and len(runs) >= 3
        assert len({r.run_id for r in runs}) == len(runs)


# a consistent effect still varies a little from seed to seed (the same difference in every pair is no
# evidence to a t-test: `paired_test`); the offsets sum to 0, so the means stay
JITTER = (0.01, -0.01, 0.0)


def fabricate(run, seed, point, **summary):
    r = copy.deepcopy(run)
    r.update(seed=seed, point=point, group=",".join(f"{k}={v}" for k, v in point.items()))
    r["run_id"] = f"{r['group']},seed={seed}"
    r["summary"].update(summary)
    return r


def test_conclusions_claim_only_what_the_numbers_show(finished, tmp_path):
    _, out = finished
    base = done(out, "fusion.query=text,seed=0")
    study = study_from_dict(tiny_study(seeds=[0, 1, 2], grid={"fusion.dim": [32, 64]}, snapshots=[]))
    runs = []
    # pointing: consistently +0.10 for the larger block; entropy: noise around the same mean
    for seed, (p, e_small, e_large) in enumerate([(0.50, 0.80, 0.70), (0.55, 0.70, 0.80), (0.52, 0.75, 0.76)]):
        runs.append(fabricate(base, seed, {"fusion.dim": 32}, pointing_image_best=p, entropy_mean=e_small))
        large = fabricate(base, seed, {"fusion.dim": 64}, pointing_image_best=p + 0.10 + JITTER[seed],
                          entropy_mean=e_large)
        large["fusion_params"] = 4 * base["fusion_params"]
        large["attention"] = "entmax15"
        runs.append(large)
    paths = write_report(study, runs, tmp_path)
    text = paths["report"].read_text()
    assert "**Best-head pointing (image) was higher with fusion.dim=64 than with fusion.dim=32**" in text
    assert "0.623 ± 0.015 vs 0.523 ± 0.025" in text
    assert "Mean normalised entropy: no difference beyond seed noise" in text
    assert paths["grounding_vs_size"].stat().st_size > 0 and paths["dense_vs_sparse"].stat().st_size > 0
    one_seed = [r for r in runs if r["seed"] == 0]
    text = write_report(study_from_dict(tiny_study(grid={"fusion.dim": [32, 64]})), one_seed,
                        tmp_path / "one")["report"].read_text()
    assert "no estimate of seed noise, so no conclusion" in text and "was higher with fusion.dim" not in text


def test_conclusions_use_only_the_runs_that_ground(finished, tmp_path):
    """Strict pointing 0.9 / 0.95 grounds at 0.85; one run at 0.6 (image) does not: the first table says so,
    and the size comparison pairs the two seeds that ground at both sizes (seed 2 drops out with its partner)."""
    _, out = finished
    base = done(out, "fusion.query=text,seed=0")
    study = study_from_dict(tiny_study(seeds=[0, 1, 2], grid={"fusion.dim": [32, 64]}, snapshots=[],
                                       grounded_pointing=0.85))
    runs = []
    for seed in range(3):
        small_image = 0.6 if seed == 2 else 0.9
        runs.append(fabricate(base, seed, {"fusion.dim": 32}, pointing_image_best_strict=small_image,
                              pointing_audio_best_strict=0.95, entropy_mean=0.5 + 0.01 * seed))
        runs.append(fabricate(base, seed, {"fusion.dim": 64}, pointing_image_best_strict=0.9,
                              pointing_audio_best_strict=0.95,
                              entropy_mean=0.7 + 0.014 * seed + (0.5 if seed == 2 else 0)))
    text = write_report(study, runs, tmp_path)["report"].read_text()
    first = text.index("## Grounding per run")
    assert first < text.index("## Results per grid point") < text.index("## Conclusions")
    table = text[first:text.index("## Results per grid point")]
    assert "| fusion.dim=32,seed=2 | 32 | 2 |" in table and "| 0.600 |" in table and "**no**" in table
    assert table.count("| yes |") == 5
    assert "Left out of the conclusions about heads (1 of 6 runs do not ground):** fusion.dim=32,seed=2" in table
    # entropy 0.50/0.51 vs 0.70/0.714 over seeds 0 and 1: +0.200 and +0.204; seed 2's +0.728 is not in it
    assert "(0.707 ± 0.010 vs 0.505 ± 0.007; paired difference +0.202 ± 0.003 over 2 grounded pairs" in text
    # grounding itself is compared over all three seeds, the one that does not ground included: 0 / 0 / +0.3
    assert ("Best-head strict pointing (image): no difference beyond seed noise between fusion.dim=64 and "
            "fusion.dim=32 (0.900 ± 0.000 vs 0.800 ± 0.173; paired difference +0.100 ± 0.173 over 3 seed-matched "
            "pairs") in text


def test_a_level_that_never_grounds_is_compared_on_grounding_but_not_on_its_heads(finished, tmp_path):
    """Sparse heads that never point strictly at sounds: the report says their grounding is worse (every run
    counts) and declines to compare their heads' entropy (no seed has both runs grounding)."""
    _, out = finished
    base = done(out, "fusion.query=text,seed=0")
    study = study_from_dict(tiny_study(seeds=[0, 1, 2], grid={"fusion.attention": ["softmax", "topk"]},
                                       snapshots=[], grounded_pointing=0.85))
    runs = []
    for seed in range(3):
        runs.append(fabricate(base, seed, {"fusion.attention": "softmax"}, pointing_image_best_strict=0.95,
                              pointing_audio_best_strict=0.86 + 0.01 * seed, entropy_mean=0.6))
        runs.append(fabricate(base, seed, {"fusion.attention": "topk"}, pointing_image_best_strict=0.94,
                              pointing_audio_best_strict=0.66 + 0.02 * seed, entropy_mean=0.3))
    report = write_report(study, runs, tmp_path)
    text = report["report"].read_text()
    assert ("**Best-head strict pointing (audio) was lower with fusion.attention=topk than with "
            "fusion.attention=softmax** (0.680 ± 0.020 vs 0.870 ± 0.010; paired difference -0.190 ± 0.010 over 3 "
            "seed-matched pairs") in text
    section = text[text.index("### fusion.attention"):text.index("### Grounding against chance")]
    assert "- Mean normalised entropy:" not in section and "(0.300" not in section
    assert ("- Not compared between fusion.attention=softmax and fusion.attention=topk, as no seed has both runs "
            "grounding: mean normalised entropy") in text
    records = json.loads(report["json"].read_text())["tests"]["factors"]
    assert {r["runs"] for r in records if r["metric"] == "pointing_audio_best_strict"} == {"all"}
    assert not [r for r in records if r["metric"] == "entropy_mean"]


def test_the_grounding_table_counts_each_runs_starts(finished, tmp_path):
    """A run whose first start stalled says it began twice; a run copied from before starts were recorded
    says '?', not 1."""
    _, out = finished
    base = done(out, "fusion.query=text,seed=0")
    assert base["train"]["restarts"] == []  # the runner records them (none in this tiny run)
    study = study_from_dict(tiny_study(seeds=[0, 1, 2], snapshots=[]))
    runs = [fabricate(base, seed, {"fusion.query": "text"}) for seed in range(3)]
    runs[1]["train"]["restarts"] = [{"step": 200, "loss": 4.3, "start": 2}]  # the start it began
    del runs[2]["train"]["restarts"]
    text = write_report(study, runs, tmp_path)["report"].read_text()
    table = text[text.index("## Grounding per run"):text.index("## Results per grid point")]
    rows = [line for line in table.splitlines() if line.startswith("| fusion.query=text,seed=")]
    assert [row.rstrip(" |").rsplit("| ", 1)[1] for row in rows] == ["1", "2", "?"]
    assert "| starts |" in table and "*starts*: how often the run's training began" in table
    del runs[0]["train"]["restarts"], runs[1]["train"]["restarts"]  # none recorded: no column
    text = write_report(study, runs, tmp_path / "old")["report"].read_text()
    assert "| starts |" not in text


def test_a_result_from_before_starts_were_recorded_takes_them_from_its_models_training_summary(finished,
                                                                                                tmp_path):
    toml, out = finished
    shutil.copytree(out / "runs", tmp_path / "runs")
    study = load_study(toml)
    runs = plan_runs(study)
    first = tmp_path / "runs" / runs[0].run_id
    record = json.loads((first / DONE).read_text())
    del record["train"]["restarts"]
    (first / DONE).write_text(json.dumps(record))
    summary = json.loads((first / "model" / "train_summary.json").read_text())
    summary["restarts"] = [{"step": 1, "loss": 9.0, "start": 2}]
    (first / "model" / "train_summary.json").write_text(json.dumps(summary))
    results = finished_results(study, runs, tmp_path / "runs")
    assert [r["train"]["restarts"] for r in results] == [summary["restarts"], []]
    shutil.rmtree(first / "model")  # no model kept: nothing to take them from, so they stay unrecorded
    assert "restarts" not in finished_results(study, runs, tmp_path / "runs")[0]["train"]


def with_shares(run, shares, chance):
    """The run with its head table replaced by heads of the given (text, image, audio) shares, each
    with a uniform head's shares `chance` (text, image, audio) for the same key counts."""
    run["heads"] = [{"layer": 0, "head": h, "share_text": t, "share_image": i, "share_audio": a,
                     **{f"uniform_share_{m}": c for m, c in zip(("text", "image", "audio"), chance)}}
                    for h, (t, i, a) in enumerate(shares)]
    return run


def test_modality_specialisation_is_summarised_and_tested(finished, tmp_path):
    _, out = finished
    base = done(out, "fusion.query=text,seed=0")
    study = study_from_dict(tiny_study(seeds=[0, 1, 2], snapshots=[]))
    runs = []
    for seed in range(3):
        # text queries see 65 image and 116 audio keys: a uniform head gives the image 65/181 = 0.359.
        # Both heads split image/audio 40/60 -> focus 0.4 - 0.359 = +0.041 each: both above uniform on image
        # (an even split of 0.5 would have called them "led by audio", |0.4 - 0.6| = 0.2)
        runs.append(with_shares(fabricate(base, seed, {"fusion.query": "text"}), [(0, 0.4, 0.6), (0, 0.4, 0.6)],
                                (0.0, 65 / 181, 116 / 181)))
        # latents also see text keys, left out before renormalising: chance image 0.288 / 0.8 = 0.36.
        # (0.5, 0.45 - 0.01 s, 0.05 + 0.01 s) -> image 0.9 - 0.02 s -> focus 0.54 - 0.02 s;
        # (0.2, 0, 0.8) -> image 0 -> focus -0.36; mean |focus| 0.45 - 0.01 s: 0.45, 0.44, 0.43
        latents = fabricate(base, seed, {"fusion.query": "latents"})
        latents["fusion_params"] = base["fusion_params"] + 64  # latent parameters: not a model-size comparison
        runs.append(with_shares(latents, [(0.5, 0.45 - 0.01 * seed, 0.05 + 0.01 * seed), (0.2, 0.0, 0.8)],
                                (0.2, 0.288, 0.512)))
    stale = tmp_path / "plots" / "grounding_vs_size.png"  # left by an earlier report of other runs
    stale_heads = tmp_path / "plots" / "heads" / "fusion.query=text,seed=9.png"
    stale_heads.parent.mkdir(parents=True)
    stale.write_bytes(b"png")
    stale_heads.write_bytes(b"png")
    paths = write_report(study, runs, tmp_path)
    assert not stale.exists() and not stale_heads.exists()
    assert (tmp_path / "plots" / "heads" / f"{runs[0]['run_id']}.png").is_file()
    text = paths["report"].read_text()
    assert "**Mean |image focus| per head (vs uniform) was higher with fusion.query=latents than with " \
           "fusion.query=text**" in text
    assert "(0.440 ± 0.010 vs 0.041 ± 0.000" in text
    # 1 of 2 heads vs 2 of 2 on every seed: the same -0.50 in all 3 pairs, which a sign test cannot call
    assert ("Fraction of heads above uniform on image: lower with fusion.query=latents than with fusion.query=text "
            "by the same -0.50 in all 3 seed-matched pairs") in text
    assert "### Model size" not in text and "grounding_vs_size" not in paths
    groups = json.loads(paths["json"].read_text())["groups"]
    assert [round(g["mean"]["modality_focus_mean"], 3) for g in groups] == [0.041, 0.44]
    assert [g["mean"]["image_led_fraction"] for g in groups] == [1.0, 0.5]


def assert_same_numbers(a, b, path="result"):
    """Equal structure and strings; floats to 1e-3: thread counts change summation order, and the
    tiny test model's margins (~0.01) magnify that in derived ratios such as Shapley shares."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same_numbers(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_numbers(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-3, abs=1e-4, nan_ok=True), path
    else:
        assert a == b, path


def test_workers_2_gives_the_same_results_as_workers_1(finished, tmp_path):
    toml, out = finished
    result = run_study(toml, tmp_path / "parallel", workers=2, progress=False)
    assert not result["failed"] and len(result["ran"]) == 2
    for r in result["runs"]:
        # one thread per worker vs two in one process: float sums may differ in the last bits
        assert_same_numbers(without_timing(r), without_timing(done(out, r["run_id"])))


def test_ray_engine_runs_a_grid_on_a_real_local_ray_instance(finished, tmp_path, capsys):
    """Two runs as Ray tasks on a local Ray instance the engine starts (and stops): the same numbers as
    the local engine's, done.json written by the driver, and a re-run skips both without starting Ray."""
    pytest.importorskip("ray")
    toml, local_out = finished
    out = tmp_path / "ray"
    assert main(["compare", str(toml), "--out", str(out), "--engine", "ray", "--cpus-per-run", "1", "--quiet"]) == 0
    assert "ran 2, skipped 0" in capsys.readouterr().out
    for run_id in ("fusion.query=text,seed=0", "fusion.query=latents,seed=0"):
        assert_same_numbers(without_timing(done(local_out, run_id)), without_timing(done(out, run_id)))
        assert done(out, run_id)["timing"]["threads"] == 1
    assert (out / "report.md").is_file()
    import ray

    assert not ray.is_initialized()  # the instance it started is stopped
    assert main(["compare", str(toml), "--out", str(out), "--engine", "ray", "--quiet"]) == 0
    assert "ran 0, skipped 2" in capsys.readouterr().out


def test_ray_engine_without_ray_or_with_local_flags_says_what_to_do(finished, tmp_path, monkeypatch, capsys):
    toml, _ = finished
    assert main(["compare", str(toml), "--out", str(tmp_path / "a"), "--address", "auto"]) == 2
    assert "--address, --cpus-per-run and --gpus-per-run go with --engine ray" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the cluster extra were not installed
    with pytest.raises(InputError, match=r"pip install \"\.\[cluster\]\""):
        run_study(load_study(toml), tmp_path / "b", engine="ray", progress=False)
    with pytest.raises(InputError, match="engine = 'slurm'"):
        run_study(load_study(toml), tmp_path / "c", engine="slurm", progress=False)


def test_zip_varies_keys_together_and_the_report_compares_each(tmp_path):
    """[zip]: compete off / on / on with sinks as three points (a full product would include sinks without
    competition, which the fusion block refuses), crossed with the grid; each key's levels are compared on
    the points that differ in it alone."""
    toml = tmp_path / "competition.toml"
    toml.write_text('name = "competition"\nseeds = [0, 1]\n[base]\npreset = "smoke"\n'
                    '[grid]\n"fusion.heads" = [2, 4]\n'
                    '[zip]\n"fusion.compete" = [false, true, true]\n"fusion.sinks" = [0, 0, 8]\n')
    study = load_study(toml)
    assert study.factors == {"fusion.heads": [2, 4], "fusion.compete": [False, True], "fusion.sinks": [0, 8]}
    runs = plan_runs(study, check_models=False)
    assert len(runs) == 2 * 3 * 2
    assert {(r.config.fusion["compete"], r.config.fusion["sinks"]) for r in runs} == {(False, 0), (True, 0), (True, 8)}
    assert runs[0].run_id == "fusion.heads=2,fusion.compete=false,fusion.sinks=0,seed=0"
    for zipped, named in (('"fusion.compete" = [false, true]\n"fusion.sinks" = [0]', "all of one length"),
                          ('"fusion.compete" = [true, true]\n"fusion.sinks" = [8, 8]', "two points are the same"),
                          ('"fusion.heads" = [2, 8]', "in both [grid] and [zip]"),
                          ('"fusion.compete" = [false]\n"fusion.sinks" = [8]', "background queries"),
                          ('"fusion.colour" = [1]', "unknown key")):
        toml.write_text(f'name = "c"\n[base]\npreset = "smoke"\n[grid]\n"fusion.heads" = [2, 4]\n[zip]\n{zipped}\n')
        with pytest.raises(InputError, match=re.escape(named)):
            plan_runs(load_study(toml), check_models=False)


def other_study_toml(folder):
    """Study "other": text queries at 2 and 4 heads; its 2-head run is the tiny study's text-query run."""
    toml = folder / "other.toml"
    toml.write_text(STUDY_TOML.replace('name = "tiny"', 'name = "other"').replace(
        '"fusion.query" = ["text", "latents"]', '"fusion.heads" = [2, 4]').replace(
        '"fusion.heads" = 2\n', '"fusion.query" = "text"\n'))
    return toml


def test_reuse_copies_another_studys_identical_run_and_computes_the_rest(finished, tmp_path, capsys):
    """--reuse: a run whose config and evaluation settings match a finished run of another study (the
    same fingerprint) is copied, relabelled, not computed; the others are computed; a changed
    evaluation setting matches nothing."""
    _, out = finished
    other = tiny_study(name="other", grid={"fusion.heads": [2, 4]}, base={**TINY_BASE, "fusion.query": "text"})
    toml = other_study_toml(tmp_path)
    dest = tmp_path / "other"
    assert main(["compare", str(toml), "--out", str(dest), "--reuse", str(out), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "[copy   ] fusion.heads=2,seed=0" in listing and "[pending] fusion.heads=4,seed=0" in listing
    assert "to run: 1; done: 0; copied from another study (--reuse): 1" in listing
    # --report-only joins the finished parts: it copies what it can, reports it, trains nothing
    assert main(["compare", str(toml), "--out", str(dest), "--reuse", str(out), "--report-only"]) == 0
    printed = capsys.readouterr().out
    assert "copied 1 run(s) from identical finished runs (--reuse): fusion.heads=2,seed=0" in printed
    assert "report from 1 of 2 runs" in printed and not (dest / "runs" / "fusion.heads=4,seed=0").exists()
    assert "**Incomplete:** 1 of 2 runs finished; missing: fusion.heads=4,seed=0." in (dest / "report.md").read_text()
    assert json.loads((dest / "study.json").read_text())["name"] == "other"  # as run_study writes it
    assert main(["compare", str(toml), "--out", str(dest), "--reuse", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ran 1, skipped 1 (already done), copied 0 (--reuse)" in printed  # copied by --report-only
    copied, source = done(dest, "fusion.heads=2,seed=0"), done(out, "fusion.query=text,seed=0")
    assert copied["reused_from"] == str((out / "runs" / "fusion.query=text,seed=0").resolve())
    assert copied["run_id"] == "fusion.heads=2,seed=0" and copied["point"] == {"fusion.heads": 2}
    relabel = {"run_id", "group", "point", "reused_from"}
    assert ({k: v for k, v in without_timing(copied).items() if k not in relabel}
            == {k: v for k, v in without_timing(source).items() if k not in relabel})
    assert (dest / "runs" / "fusion.heads=2,seed=0" / "model" / "model.safetensors").is_file()
    assert "reused_from" not in done(dest, "fusion.heads=4,seed=0")  # computed here
    assert "1 run(s) copied from another study" in (dest / "report.md").read_text()
    assert main(["compare", str(toml), "--out", str(dest), "--reuse", str(dest), "--dry-run"]) == 0
    assert "to run: 0; done: 2\n" in capsys.readouterr().out + "\n"  # its own runs are done, not copies
    stricter = study_from_dict({**other, "shapley_permutations": 3})
    result = run_study(stricter, tmp_path / "stricter", progress=False, report=False, reuse=[out, dest])
    assert result["reused"] == [] and len(result["ran"]) == 2
    with pytest.raises(InputError, match="no such folder"):
        run_study(stricter, tmp_path / "stricter", progress=False, reuse=[tmp_path / "nowhere"])


def test_a_report_folder_alone_carries_its_finished_runs_to_a_machine_that_never_ran_them(finished, tmp_path,
                                                                                           capsys):
    """--reuse of a folder holding only a study's report (results.json, as committed under
    multimodal/studies/reports/): its runs are copied from their records, no checkpoint, and the report
    written from them states what the original did; a changed evaluation setting matches none of them."""
    toml, out = finished
    lost = tmp_path / "lost"  # the study's output with its runs/ gone: what a fresh checkout holds
    lost.mkdir()
    for name in ("study.json", "report.md", "results.json"):
        shutil.copy(out / name, lost / name)
    assert main(["compare", str(toml), "--out", str(lost), "--dry-run"]) == 0
    assert "to run: 2; done: 0" in capsys.readouterr().out
    assert main(["compare", str(toml), "--out", str(lost), "--reuse", str(lost), "--dry-run"]) == 0
    assert "to run: 0; done: 0; carried over from this study's earlier output (--reuse): 2" in capsys.readouterr().out
    assert main(["compare", str(toml), "--out", str(lost), "--reuse", str(lost), "--report-only"]) == 0
    assert "copied 2 run(s)" in capsys.readouterr().out
    for run_id in ("fusion.query=text,seed=0", "fusion.query=latents,seed=0"):
        copied, source = done(lost, run_id), done(out, run_id)
        # this study's own run, from an earlier output: carried over, not copied from another study
        assert copied["carried_from"] == f"{(lost / 'results.json').resolve()} ({run_id})"
        assert "reused_from" not in copied
        assert sorted(p.name for p in (lost / "runs" / run_id).iterdir()) == [DONE]  # results, no checkpoint
        assert (json.dumps({k: v for k, v in copied.items() if k != "carried_from"}, sort_keys=True)
                == json.dumps(json.loads(json.dumps(source).replace("NaN", "null")), sort_keys=True))
    tables = [ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("|")]
    assert tables and tables == [ln for ln in (lost / "report.md").read_text().splitlines() if ln.startswith("|")]
    carried_text = (lost / "report.md").read_text()
    assert "2 run(s) computed earlier by this study and carried over" in carried_text
    assert "from another study" not in carried_text
    again = run_study(load_study(toml), lost, progress=False, report=False, reuse=[lost])
    assert again["ran"] == [] and again["reused"] == []  # done now
    stricter = study_from_dict({**tiny_study(), "shapley_permutations": 3})
    assert "to run: 2; done: 0\n" in describe_runs(stricter, tmp_path / "stricter", reuse_index([lost])) + "\n"
    capsys.readouterr()
    reuse_index([out, lost])  # lost holds the same runs as out: found, though out's come first
    assert "nothing to copy from it" not in capsys.readouterr().out
    (lost / "runs").rename(tmp_path / "gone")
    (lost / "results.json").write_text('{"runs": [')  # damaged: nothing to copy, and the user is told
    capsys.readouterr()
    assert reuse_index([lost]) == {} and "nothing to copy from it" in capsys.readouterr().out


def test_a_copy_says_whether_another_study_computed_the_run_or_this_one(finished, tmp_path, capsys):
    """A run carried over from this study's earlier output stays this study's own work (`carried_from`); one
    another study computed is `reused_from`, and stays so when carried on; the compute line says which."""
    toml, out = finished
    other_toml = other_study_toml(tmp_path)
    first = tmp_path / "first"  # study "other", its text-query run copied from study "tiny"
    assert main(["compare", str(other_toml), "--out", str(first), "--reuse", str(out), "--report-only"]) == 0
    borrowed = done(first, "fusion.heads=2,seed=0")
    assert borrowed["reused_from"] == str((out / "runs" / "fusion.query=text,seed=0").resolve())
    assert "carried_from" not in borrowed
    later = tmp_path / "later"  # study "other" again, on a machine holding only that report
    assert main(["compare", str(other_toml), "--out", str(later), "--reuse", str(first), "--dry-run"]) == 0
    assert "copied from another study (--reuse): 1" in capsys.readouterr().out  # tiny computed it
    assert main(["compare", str(other_toml), "--out", str(later), "--reuse", str(first), "--report-only"]) == 0
    assert done(later, "fusion.heads=2,seed=0") == borrowed  # still tiny's run, copied
    text = (later / "report.md").read_text()
    assert "1 run(s) copied from another study" in text and "carried over" not in text
    carried = tmp_path / "carried"  # study "tiny" carried once, then copied into "other": another study's run
    assert main(["compare", str(toml), "--out", str(carried), "--reuse", str(out), "--report-only"]) == 0
    assert "carried_from" in done(carried, "fusion.query=text,seed=0")
    again = tmp_path / "again"
    assert main(["compare", str(other_toml), "--out", str(again), "--reuse", str(carried), "--report-only"]) == 0
    copied = done(again, "fusion.heads=2,seed=0")
    assert "carried_from" not in copied and copied["reused_from"] == str(
        (carried / "runs" / "fusion.query=text,seed=0").resolve())


def test_a_study_reported_in_part_compares_the_lowest_and_highest_level_measured(finished, tmp_path):
    """fusion.heads = [2, 4, 8] with no run at 8 yet (a study reported in part): heads compares 2 with 4,
    the levels it has, not 2 with the missing 8."""
    _, out = finished
    base = done(out, "fusion.query=text,seed=0")
    study = study_from_dict(tiny_study(seeds=[0, 1, 2], grid={"fusion.heads": [2, 4, 8]}, snapshots=[]))
    runs = [fabricate(base, seed, {"fusion.heads": h}, pointing_image_best=p + (0.1 + JITTER[seed]) * (h == 4))
            for seed, p in enumerate([0.50, 0.55, 0.52]) for h in (2, 4)]
    text = write_report(study, runs, tmp_path)["report"].read_text()
    assert ("**Best-head pointing (image) was higher with fusion.heads=4 than with fusion.heads=2** "
            "(0.623 ± 0.015 vs 0.523 ± 0.025") in text
    assert "no metric was measured at two levels" not in text


def test_a_numeric_key_with_three_levels_is_compared_step_by_step_as_well(finished, tmp_path):
    """fusion.heads = [2, 4, 8] where pointing holds from 2 to 4 heads and rises from 4 to 8: the report
    compares 2 with 8 (listing each level's mean there, once) and each level with the next, so it says
    where along the scale the change happens."""
    _, out = finished
    base = done(out, "fusion.query=text,seed=0")
    study = study_from_dict(tiny_study(seeds=[0, 1, 2], grid={"fusion.heads": [2, 4, 8]}, snapshots=[]))
    runs = [fabricate(base, seed, {"fusion.heads": h},
                      pointing_image_best=p + {2: 0.0, 4: JITTER[seed] / 2, 8: 0.1 + JITTER[seed]}[h])
            for seed, p in enumerate([0.50, 0.55, 0.52]) for h in (8, 2, 4)]
    text = write_report(study, runs, tmp_path)["report"].read_text()
    lines = [ln for ln in text.splitlines()
             if ln.startswith(("- **Best-head pointing (image) was", "- Best-head pointing (image): no difference"))
             and "fusion.heads=" in ln]
    assert len(lines) == 3, lines
    assert lines[0].startswith("- **Best-head pointing (image) was higher with fusion.heads=8 than with "
                               "fusion.heads=2** (0.623 ± 0.015 vs 0.523 ± 0.025")
    assert lines[0].endswith("Mean by level: 2: 0.523, 4: 0.523, 8: 0.623.")
    assert lines[1].startswith("- Best-head pointing (image): no difference beyond seed noise between "
                               "fusion.heads=4 and fusion.heads=2 (0.523 ± 0.020 vs 0.523 ± 0.025")
    assert lines[2].startswith("- **Best-head pointing (image) was higher with fusion.heads=8 than with "
                               "fusion.heads=4** (0.623 ± 0.015 vs 0.523 ± 0.020")
    assert sum("Mean by level" in ln for ln in lines) == 1
    records = json.loads((tmp_path / "results.json").read_text())["tests"]["factors"]
    assert {(r["a"], r["b"]) for r in records if r["metric"] == "pointing_image_best"} == {(2, 8), (2, 4), (4, 8)}


def test_zip_keys_that_never_vary_alone_are_compared_row_by_row(finished, tmp_path):
    """A [zip] whose keys always change together (a recipe of several settings): no key can be compared
    alone, so the report compares each row with the first, paired by seed."""
    _, out = finished
    base = done(out, "fusion.query=text,seed=0")
    study = study_from_dict(tiny_study(seeds=[0, 1, 2], grid={}, snapshots=[],
                                       zip={"fusion.compete": [False, True], "fusion.sinks": [0, 8]}))
    runs = []
    for seed, p in enumerate([0.50, 0.55, 0.52]):
        runs.append(fabricate(base, seed, {"fusion.compete": False, "fusion.sinks": 0}, pointing_image_best=p))
        runs.append(fabricate(base, seed, {"fusion.compete": True, "fusion.sinks": 8},
                              pointing_image_best=p + 0.2 + JITTER[seed]))
    text = write_report(study, runs, tmp_path)["report"].read_text()
    assert "### [zip] rows" in text and "### fusion.compete" not in text
    assert ("**Best-head pointing (image) was higher with [zip] rows=fusion.compete=true, fusion.sinks=8 than with "
            "[zip] rows=fusion.compete=false, fusion.sinks=0** (0.723 ± 0.015 vs 0.523 ± 0.025") in text


def test_zip_rows_are_compared_when_only_some_keys_vary_alone(finished, tmp_path):
    """Three recipes where one key varies alone between the last two rows (fusion.heads) and two never do
    (compete, sinks): heads gets its own paired test, and the rows are compared with the first as well."""
    _, out = finished
    base = done(out, "fusion.query=text,seed=0")
    study = study_from_dict(tiny_study(seeds=[0, 1, 2], grid={}, snapshots=[], zip={
        "fusion.compete": [False, True, True], "fusion.sinks": [0, 8, 8], "fusion.heads": [2, 2, 4]}))
    rows = [{"fusion.compete": False, "fusion.sinks": 0, "fusion.heads": 2},
            {"fusion.compete": True, "fusion.sinks": 8, "fusion.heads": 2},
            {"fusion.compete": True, "fusion.sinks": 8, "fusion.heads": 4}]
    runs = [fabricate(base, seed, point, pointing_image_best=p + (0.2 + JITTER[seed]) * i)
            for seed, p in enumerate([0.50, 0.55, 0.52]) for i, point in enumerate(rows)]
    text = write_report(study, runs, tmp_path)["report"].read_text()
    assert "### fusion.heads" in text and "### [zip] rows" in text
    assert "### fusion.compete" not in text and "### fusion.sinks" not in text
    # heads 2 -> 4 between the rows that differ in it alone: +0.2 on every seed (give or take JITTER)
    assert ("**Best-head pointing (image) was higher with fusion.heads=4 than with fusion.heads=2** "
            "(0.923 ± 0.006 vs 0.723 ± 0.015") in text
    first = "[zip] rows=fusion.compete=false, fusion.sinks=0, fusion.heads=2"
    assert ("**Best-head pointing (image) was higher with [zip] rows=fusion.compete=true, fusion.sinks=8, "
            f"fusion.heads=4 than with {first}** (0.923 ± 0.006 vs 0.523 ± 0.025") in text


def test_a_runs_output_reaches_its_log_and_the_terminal_line_by_line(tmp_path, capsys):
    """While a run goes on (hours), `tail -f runs/<id>/log.txt` and a nohup log show each line once it is whole,
    not when a buffer fills or the run ends."""
    log = tmp_path / "run" / "log.txt"
    with run_output(tmp_path / "run", "a=1,seed=0"):
        print("step 80/1600: loss 4.5", end="")
        assert log.read_text() == "" and capsys.readouterr().out == ""  # an unfinished line waits
        print()
        print("step 160/1600: loss 3.7")
        assert log.read_text() == "step 80/1600: loss 4.5\nstep 160/1600: loss 3.7\n"
        assert capsys.readouterr().out == "[a=1,seed=0] step 80/1600: loss 4.5\n[a=1,seed=0] step 160/1600: loss 3.7\n"
        print("the end, unfinished", end="")
    assert log.read_text().endswith("the end, unfinished\n")
    assert capsys.readouterr().out == "[a=1,seed=0] the end, unfinished\n"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2,
                    reason="needs CPU affinity and 2 cores")
def test_a_study_pinned_to_fewer_cores_splits_those_among_its_workers():
    """`taskset -c 0 multimodal compare ...`: the study counts the one core it may use, not the machine's, so
    studies side by side on their own cores do not each start a thread per core of the machine."""
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert usable_cores() == 1 < os.cpu_count()
    finally:
        os.sched_setaffinity(0, before)
    assert usable_cores() == len(before)


def test_task_variety_runs_with_captions_about_one_modality_finish(tmp_path):
    """The task-variety study's runs (captions about the picture only / the sounds only) go through
    evaluation and analysis; each is scored on the one modality its captions name (the other is n/a)."""
    study = study_from_dict(tiny_study(name="tv", grid={"captions": ["image", "audio"]}))
    result = run_study(study, tmp_path / "tv", progress=False)
    assert not result["failed"] and len(result["ran"]) == 2
    for run in result["runs"]:
        scored = run["point"]["captions"]
        other = "audio" if scored == "image" else "image"
        assert run["summary"].get(pointing_best_strict(scored)) is not None, scored
        assert run["summary"].get(pointing_best_strict(other)) is None, scored
    assert "| captions=audio,seed=0 | audio | 0 |" in (tmp_path / "tv" / "report.md").read_text()


def test_train_only_then_analysed_elsewhere_gives_the_runs_results(finished, tmp_path, capsys):
    """--train-only trains and stops (no done.json, no report); the model folders alone, copied to another
    study folder (as from a GPU machine), are analysed there without training again, to the same results."""
    toml, out = finished
    gpu = tmp_path / "gpu"
    assert main(["compare", str(toml), "--out", str(gpu), "--train-only", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "trained 2," in printed and "without --train-only analyses them" in printed
    assert not list(gpu.glob("runs/*/done.json")) and not (gpu / "report.md").exists()
    here = tmp_path / "here"
    for model in gpu.glob("runs/*/model"):  # what comes back: the weights and the train summary, no optimiser
        dst = here / "runs" / model.parent.name / "model"
        shutil.copytree(model, dst, ignore=shutil.ignore_patterns("train_state*"))
        summary = json.loads((dst / "train_summary.json").read_text())
        summary["config"]["device"] = "cuda"  # as a GPU machine's training writes it
        (dst / "train_summary.json").write_text(json.dumps(summary))
    assert main(["compare", str(toml), "--out", str(here), "--quiet"]) == 0
    assert "ran 2," in capsys.readouterr().out
    for run_id in ("fusion.query=text,seed=0", "fusion.query=latents,seed=0"):
        assert done(here, run_id)["train"]["loaded"] is True  # analysed, not trained again
        assert_same_numbers(without_timing(done(here, run_id)), without_timing(done(out, run_id)))
        assert done(here, run_id)["timing"]["train_device"] == "cuda"
    assert "2 run(s) trained on cuda and analysed on cpu" in (here / "report.md").read_text()
    # a second --train-only trains nothing again: each run's log is as the first left it
    logs = {p: p.read_text() for p in gpu.glob("runs/*/log.txt")}
    assert len(logs) == 2
    assert main(["compare", str(toml), "--out", str(gpu), "--train-only", "--quiet"]) == 0
    assert {p: p.read_text() for p in gpu.glob("runs/*/log.txt")} == logs


def test_a_study_split_by_seeds_runs_each_part_once_and_reports_the_whole(tmp_path, capsys):
    """--seeds runs only those seeds' pending runs and leaves the others pending (a study split between two
    processes sharing OUT); the part that ends last writes the report over every run finished there."""
    toml = tmp_path / "two_seeds.toml"
    toml.write_text(STUDY_TOML.replace("seeds = [0]", "seeds = [0, 1]").replace("snapshots = [0, 1, 2]", "")
                    .replace('["text", "latents"]', '["text"]'))
    out = tmp_path / "report"
    assert main(["compare", str(toml), "--out", str(out), "--seeds", "1", "--quiet"]) == 0
    assert "ran 1, skipped 0 (already done), copied 0 (--reuse), left 1 (other seeds" in capsys.readouterr().out
    assert [p.parent.name for p in out.glob("runs/*/done.json")] == ["fusion.query=text,seed=1"]
    report = (out / "report.md").read_text()
    assert "**Incomplete:** 1 of 2 runs finished; missing: fusion.query=text,seed=0." in report
    assert "**Setup.** 2 runs (1 grid point x 2 seeds: 0, 1)" in report  # the study's runs, not those finished
    assert main(["compare", str(toml), "--out", str(out), "--seeds", "0", "--quiet"]) == 0
    assert "ran 1, skipped 1 (already done)" in capsys.readouterr().out
    assert [r["run_id"] for r in json.loads((out / "results.json").read_text())["runs"]] == [
        "fusion.query=text,seed=0", "fusion.query=text,seed=1"]
    assert "Incomplete" not in (out / "report.md").read_text()
    assert main(["compare", str(toml), "--out", str(out), "--seeds", "0,5", "--quiet"]) != 0
    assert "seeds [0, 5]: give some of study tiny's seeds (0, 1)" in capsys.readouterr().err
    assert main(["compare", str(toml), "--out", str(out), "--seeds", "0", "--report-only"]) != 0
    assert "--report-only runs none" in capsys.readouterr().err


def test_the_same_nonzero_difference_in_every_pair_is_not_called_a_difference():
    """Pointing moves in steps of one phrase, so two seed pairs can differ by exactly the same amount: the
    paired t is then infinite, which is no evidence (the size study's 8 vs 2 heads, strict audio pointing,
    +0.012 in both pairs, was reported as 'higher' with |t| = inf). The exact sign test decides instead."""
    from multimodal.compare.report import _sentence, paired_test

    test = paired_test([0.884, 0.908], [0.896, 0.920])
    assert test["n"] == 2 and test["diff_std"] == 0 and not test["significant"]
    text = _sentence("Best-head strict pointing (audio)", ".3f", test, "fusion.heads=8", "fusion.heads=2")
    assert "by the same +0.012 in all 2 seed-matched pairs" in text and "sign test p = 0.500 >= 0.05" in text
    assert "no conclusion" in text and "**" not in text
    six = paired_test([0.5] * 6, [0.6] * 6)  # one side in 6 of 6 pairs: the sign test passes (p = 0.031)
    assert six["significant"] and round(six["sign_p"], 3) == 0.031
    rounded = paired_test([0.1, 0.7], [0.1 + 0.012, 0.7 + 0.012])  # equal up to float rounding: the same
    assert rounded["diff_std"] == 0 and not rounded["significant"]
    spread = paired_test([0.884, 0.908, 0.90], [0.896, 0.921, 0.913])  # a real spread: tested as before
    assert spread["significant"] and spread["diff_std"] > 0


def test_a_levels_mean_is_over_the_runs_that_share_the_compared_pairs_other_values():
    """size's [zip]: layers 1/2/4 at 4 heads beside heads 2/4/8 at 2 layers. Comparing heads 2 with 8 (both at
    2 layers), the heads=4 mean is the 2-layer runs' (0.90), not a pool with the 1- and 4-layer runs (0.60)."""
    accuracy = {(1, 4): 0.30, (2, 4): 0.90, (4, 4): 0.60, (2, 2): 0.80, (2, 8): 0.96}
    runs = [{"point": {"fusion.layers": layers, "fusion.heads": heads}, "seed": seed,
             "summary": {"matching_accuracy": acc + 0.01 * seed}}
            for (layers, heads), acc in accuracy.items() for seed in range(3)]
    lines, records, _ = factor_conclusions(runs, {"fusion.heads": [2, 4, 8]})
    accuracy_line = next(line for line in lines if line.startswith("- Matching accuracy"))
    assert accuracy_line.endswith("Mean by level: 2: 0.810, 4: 0.910, 8: 0.970.")
    # lowest with highest, then each level with the next, each over the 3 runs at 2 layers
    assert [(r["a"], r["b"], r["n"]) for r in records] == [(2, 8, 3), (2, 4, 3), (4, 8, 3)]


def test_the_windowed_encoders_layers_written_out_are_the_same_run_as_the_encoders_own():
    """encoder_depth = 2 and encoder_window = 1 build the windowed encoders' own layers (2 blocks attending one
    cell / column either side): the same initial weights as -1 / -1, so the same fingerprint and a run to copy,
    not to train again; 2 blocks attending globally (window 0) are another model, and so is window 1 on the
    default's column-only audio layers (no window writes out "within its own column")."""
    import torch
    from multimodal.compare.study import Run, fingerprint
    from multimodal.train import TrainConfig, build_model

    study = study_from_dict(tiny_study())
    own, written, wide = (TrainConfig(steps=2, audio_encoder="ast-window-mel40-scenes", encoder_depth=d,
                                      encoder_window=w) for d, w in ((-1, -1), (2, 1), (2, 0)))
    runs = [Run("r", (), 0, tc) for tc in (own, written, wide)]
    assert fingerprint(runs[0], study) == fingerprint(runs[1], study) != fingerprint(runs[2], study)
    a, b = build_model(own).state_dict(), build_model(written).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert build_model(wide).encoders["image"].model.__class__.__name__ == "VisionTransformer"
    column, windowed = TrainConfig(steps=2), TrainConfig(steps=2, encoder_depth=2, encoder_window=1)
    assert column.audio_encoder == "ast-column-mel40-scenes"
    assert fingerprint(Run("r", (), 0, column), study) != fingerprint(Run("r", (), 0, windowed), study)
