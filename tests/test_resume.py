"""Training never destroys what it did not write, and a run stopped with Ctrl-C resumes exactly.

Each resume test compares the resumed run with one uninterrupted run of the same config, tensor
by tensor with torch.equal (max abs diff 0.0): model.safetensors, and train_state.safetensors
(optimizer moments and steps, data order, torch RNG); and the training state's JSON (the
loop's numpy generator, negative mining, running statistics, history) but for wall-clock
times. The config exercises every source of randomness the loop has: dropout (torch),
negatives (their kinds and the changes within each kind mined), masked words and the data
order (numpy), the curriculum's end (step 2) and a new epoch every two steps (8 scenes,
batches of 4); checkpoints at 2, 4 and 5.
"""

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import multimodal.train.loop as loop
from multimodal.cli import main
from multimodal.errors import CheckpointError
from multimodal.model import MultimodalModel
from multimodal.train import load_config, train
from multimodal.train.loop import STAGING, TRAIN_STATE, TrainingInterrupted
from multimodal.types import InputError

RICH = {"fusion.dim": 32, "fusion.heads": 2, "fusion.layers": 1, "fusion.dropout": 0.1, "steps": 5,
        "curriculum_steps": 2, "masked_word_weight": 0.5, "match": "bilinear", "checkpoint_every": 2,
        "eval_every": 2, "val_scenes": 4, "mining_values": True}
RICH_ARGS = ["train", "--preset", "smoke", *[a for k, v in RICH.items()
                                             for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, bool) else v}")]]
TINY = {"fusion.dim": 32, "fusion.heads": 2, "fusion.layers": 1}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def ctrl_c_as_a_terminal_gives_it():
    """Python's own Ctrl-C handler, even when the suite was started with SIGINT ignored (a shell's
    background job, some CI runners): that is the setting whose Ctrl-C training handles."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def rich(**overrides):
    return load_config("smoke", overrides={**RICH, **overrides})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    # pin the thread count this process runs at, as the command-line test's child pins it: on some hosts a
    # process that has called set_num_threads (even with the count it had) sums some gradients in another
    # order than one that has not (2026-12-06, 2 vCPUs: the AST patch embedding differed by 2e-9 after 5 steps)
    torch.set_num_threads(torch.get_num_threads())
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(rich(), out, progress=False)
    return out


def without_times(meta: dict) -> dict:
    meta = json.loads(json.dumps(meta))
    meta.get("loop", {}).pop("elapsed_s", None)
    for h in meta["history"]:
        h.pop("elapsed_s")
    return meta


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("model.safetensors", f"{TRAIN_STATE}.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys(), name
        for k in ta:
            diff = (ta[k].double() - tb[k].double()).abs().max().item() if ta[k].numel() else 0.0
            assert torch.equal(ta[k], tb[k]), f"{name} {k}: max abs diff {diff}"
    ja, jb = (json.loads((d / f"{TRAIN_STATE}.json").read_text()) for d in (a, b))
    assert without_times(ja) == without_times(jb)


def send_sigint_during_step(monkeypatch, k: int) -> None:
    """A real SIGINT to this process in the middle of the k-th step (1-based), while its negatives are drawn."""
    calls, original = [], loop.candidate_captions

    def sending(*args, **kwargs):
        calls.append(k)
        if len(calls) == k:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "candidate_captions", sending)


@pytest.mark.parametrize("k", [1, 2, 3], ids=["mid-curriculum", "checkpoint-and-curriculum-end", "mid-epoch"])
def test_ctrl_c_at_any_step_resumes_bit_identical(tmp_path, monkeypatch, uninterrupted, k, capfd):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        send_sigint_during_step(m, k)
        with pytest.raises(TrainingInterrupted) as stopped:
            train(rich(), out, progress=False)
    assert stopped.value.step == k  # the step under way when Ctrl-C came was finished, not dropped
    assert "Ctrl-C: finishing this step" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back
    assert MultimodalModel.from_pretrained(out).meta["step"] == k
    assert json.loads((out / f"{TRAIN_STATE}.json").read_text())["step"] == k
    assert not (out / "train_summary.json").exists()  # not a finished run

    random.seed(k), np.random.seed(k), torch.manual_seed(k)  # what the process drew since must not matter
    summary = train(rich(), out, resume=True, progress=False)
    assert summary["steps"] == 5
    assert_same_run(out, uninterrupted)


def test_ctrl_c_after_a_stall_restart_resumes_the_restarted_start_bit_identical(tmp_path, monkeypatch):
    """Start 1 "stalls" at step 2 (stall_loss -1) and the run starts again; Ctrl-C in the second start's
    step 3 (the 5th step run) and a resume end where the uninterrupted run with its restart ends."""
    config = rich(stall_step=2, stall_loss=-1.0, stall_restarts=1)
    train(config, tmp_path / "whole", progress=False)
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        send_sigint_during_step(m, 5)
        with pytest.raises(TrainingInterrupted) as stopped:
            train(config, out, progress=False)
    assert stopped.value.step == 3
    state = json.loads((out / f"{TRAIN_STATE}.json").read_text())["loop"]
    assert state["attempt"] == 1 and [r["start"] for r in state["restarts"]] == [2]
    summary = train(config, out, resume=True, progress=False)
    assert [r["start"] for r in summary["restarts"]] == [2]
    assert_same_run(out, tmp_path / "whole")


def test_ctrl_c_on_the_command_line_saves_and_prints_the_resume_command(tmp_path, uninterrupted):
    """The real thing: SIGINT from outside to a `multimodal train` process, then the printed command."""
    out = tmp_path / "run"
    child = ("import signal, sys, torch; torch.set_num_threads(int(sys.argv[1])); "  # the numbers of this process
             "signal.signal(signal.SIGINT, signal.default_int_handler); "  # even if the suite runs with SIGINT ignored
             "from multimodal.cli import main; sys.exit(main(sys.argv[2:]))")
    proc = subprocess.Popen([sys.executable, "-c", child, str(torch.get_num_threads()), *RICH_ARGS, "--out", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / f"{TRAIN_STATE}.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the first checkpoint (step 2) is on disk: training is under way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    stopped_at = json.loads((out / f"{TRAIN_STATE}.json").read_text())["step"]
    assert 2 <= stopped_at < 5 and f"interrupted after step {stopped_at} of 5" in err
    command = shlex.split(err.split("Resume with:")[1].strip().splitlines()[0])
    assert command[:2] == ["multimodal", "train"] and command[-1] == "--resume"

    assert main(command[1:]) == 0
    assert_same_run(out, uninterrupted)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch, uninterrupted, capsys):
    out = tmp_path / "run"
    written, original = [], loop.save_file

    def full_disk(*args, **kwargs):
        written.append(1)
        if len(written) == 2:  # step 4's training state, after its model files were written
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(loop, "save_file", full_disk)
        with pytest.raises(OSError, match="No space"):
            train(rich(), out, progress=False)
    assert (out / STAGING).is_dir()  # the unfinished write
    assert MultimodalModel.from_pretrained(out).meta["step"] == 2  # the previous checkpoint, whole
    assert json.loads((out / f"{TRAIN_STATE}.json").read_text())["step"] == 2

    train(rich(), out, resume=True, progress=False)
    assert "resuming from step 2" in capsys.readouterr().out
    assert not (out / STAGING).exists()
    assert_same_run(out, uninterrupted)


def test_a_crash_while_moving_a_checkpoint_into_place_is_finished_on_resume(tmp_path, monkeypatch, uninterrupted,
                                                                            capsys):
    out = tmp_path / "run"
    moves, original = [], loop._move_into_place

    def crash_halfway(staging, out_dir):
        moves.append(1)
        if len(moves) < 2:
            return original(staging, out_dir)
        os.replace(staging / "model.safetensors", out_dir / "model.safetensors")  # step 4's weights, then the crash
        raise OSError("killed")

    with monkeypatch.context() as m:
        m.setattr(loop, "_move_into_place", crash_halfway)
        with pytest.raises(OSError, match="killed"):
            train(rich(), out, progress=False)
    assert MultimodalModel.from_pretrained(out) is not None  # loadable in between

    train(rich(), out, resume=True, progress=False)
    assert "resuming from step 4" in capsys.readouterr().out  # the complete write was finished, not lost
    assert_same_run(out, uninterrupted)


# ---------------------------------------------------------------------------------------
# Folders training must not damage
# ---------------------------------------------------------------------------------------


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_of_other_files_is_refused_and_left_intact(tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("x\n")
    (victim / "config.json").write_text("{\"mine\": true}\n")  # a name a checkpoint also uses
    before = tree(victim)
    tc = load_config("smoke", overrides={**TINY, "steps": 1})
    for flags in ({}, {"overwrite": True}):
        with pytest.raises(InputError, match="precious.txt.*choose another --out"):
            train(tc, victim, progress=False, **flags)
    with pytest.raises(InputError, match="nothing to resume"):
        train(tc, victim, resume=True, progress=False)
    assert main(["train", "--preset", "smoke", "--out", str(victim)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "precious.txt" in err and "Traceback" not in err
    assert tree(victim) == before


def test_a_trained_checkpoint_needs_resume_or_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train(load_config("smoke", overrides={**TINY, "steps": 3}), out, progress=False)
    (out / "notes.txt").write_text("mine\n")
    before = tree(out)
    with pytest.raises(InputError, match=r"checkpoint \(step 3\).*--resume.*--overwrite"):
        train(load_config("smoke", overrides={**TINY, "steps": 2}), out, progress=False)
    assert main(["train", "--preset", "smoke", "--set", "steps=2", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert tree(out) == before  # not a byte changed

    with pytest.raises(InputError, match="choose one"):
        train(load_config("smoke", overrides={**TINY, "steps": 2}), out, resume=True, overwrite=True, progress=False)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 3
    with monkeypatch.context() as m:  # overwritten, and stopped after its first step: the old summary goes
        send_sigint_during_step(m, 1)
        with pytest.raises(TrainingInterrupted):
            train(load_config("smoke", overrides={**TINY, "steps": 2}), out, overwrite=True, progress=False)
    assert not (out / "train_summary.json").exists()
    assert MultimodalModel.from_pretrained(out).meta["step"] == 1
    train(load_config("smoke", overrides={**TINY, "steps": 2}), out, resume=True, progress=False)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2
    fresh = tmp_path / "fresh"
    train(load_config("smoke", overrides={**TINY, "steps": 2}), fresh, progress=False)
    assert MultimodalModel.from_pretrained(out).meta["step"] == 2  # a new run from step 0 (stopped, resumed)
    wa, wb = load_file(str(out / "model.safetensors")), load_file(str(fresh / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (out / "notes.txt").read_text() == "mine\n"


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    tc = load_config("smoke", overrides={**TINY, "steps": 1})
    with pytest.raises(InputError, match="nothing to resume.*does not exist.*leave out --resume"):
        train(tc, tmp_path / "missing", resume=True, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="nothing to resume.*is empty"):
        train(tc, tmp_path / "empty", resume=True, progress=False)
    assert not (tmp_path / "missing").exists()

    model_only = tmp_path / "model"  # weights without training state, e.g. a shipped model
    build = train(tc, tmp_path / "run", progress=False)
    assert build["steps"] == 1
    MultimodalModel.from_pretrained(tmp_path / "run").save_pretrained(model_only)
    with pytest.raises(InputError, match="no training state.*nothing to resume.*--overwrite"):
        train(tc, model_only, resume=True, progress=False)
    with pytest.raises(InputError, match="--overwrite"):
        train(tc, model_only, progress=False)


def test_a_damaged_training_state_is_refused_with_what_to_do(tmp_path):
    """A user is told what to do; `problem` alone (what a study prints before training the run again) is
    the fault without that advice. The folder is left as it was."""
    out = tmp_path / "run"
    tc = load_config("smoke", overrides={**TINY, "steps": 1})
    train(tc, out, progress=False)
    state = out / f"{TRAIN_STATE}.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    before = tree(out)
    with pytest.raises(CheckpointError, match="is damaged.*resume from a copy.*--overwrite") as caught:
        train(tc, out, resume=True, progress=False)
    assert "is damaged" in caught.value.problem and "--overwrite" not in caught.value.problem
    assert tree(out) == before
