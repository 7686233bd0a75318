"""Running a study on this machine: `run_study` plans the runs, skips the finished ones, runs the
rest one after another or in a pool of spawned worker processes, and writes the report from the
finished runs. `execute_run` is one run: train (or reuse a finished training of the same config),
analyse the final model and the snapshots, write `runs/<run id>/done.json` (or `error.txt` with
the traceback when it fails). What a run prints goes to its own `runs/<run id>/log.txt` too, and
reaches the terminal with the run id in front of each line (runs in parallel print in turns).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager, redirect_stdout
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm import tqdm

from multimodal.compare.analyse import analyse_model, initial_model, seed_everything
from multimodal.compare.study import (DONE, ERROR, LOG, MODEL, RESULT_FORMAT, RUN_ONLY_KEYS, ReportedRun, Run,
                                      Study, copy_kind, finished_training, fingerprint, interrupted_training,
                                      load_study, plan_runs, reusable_source, run_status, source_study)
from multimodal.errors import CheckpointError
from multimodal.model import MultimodalModel
from multimodal.train import train
from multimodal.types import InputError


class _RunOutput:
    """A text stream for `redirect_stdout`: each whole line goes to the run's log file and, with the run id in
    front, to the stream that was stdout before."""

    def __init__(self, log, terminal, run_id: str):
        self.log, self.terminal, self.prefix, self.pending = log, terminal, f"[{run_id}] ", ""

    def write(self, text: str) -> int:
        self.log.write(text)
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()  # an unfinished line waits for its end
        for line in lines:
            self.terminal.write(self.prefix + line + "\n")
        if lines:  # a log file or a pipe shows each line as it comes (`tail -f`), not when a buffer fills
            self.flush()
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()


@contextmanager
def run_output(folder: Path, run_id: str):
    """Within the block, stdout goes to `folder/log.txt` (appended) and to the terminal prefixed with the run id,
    each line as soon as it is whole."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOG, "a") as log:
        stream = _RunOutput(log, sys.stdout, run_id)
        try:
            with redirect_stdout(stream):
                yield
        finally:
            if stream.pending:
                stream.write("\n")
            stream.flush()


# ---------------------------------------------------------------------------------------
# One run: train (or load), analyse the final model and the snapshots, write done.json
# ---------------------------------------------------------------------------------------


def execute_run(run: Run, study: Study, runs_dir: str | Path, progress: bool = True,
                train_only: bool = False) -> dict | None:
    """Train (or load), evaluate and analyse one run; write and return its done.json results. `train_only`:
    train (or go on training) and stop there, returning None; a later call analyses the model it left.

    A training interrupted earlier (a crash, Ctrl-C, a killed worker) goes on from its last checkpoint, and
    ends bit-identical on the CPU to one never interrupted (`train(resume=True)`); a half-finished run of
    another config starts clean. What the run prints goes to its log.txt too (`run_output`). Runs with the
    process's torch threads (a worker process's are set when it starts)."""
    folder = Path(runs_dir) / run.run_id
    if run_status(run, study, Path(runs_dir)) == "done":
        return json.loads((folder / DONE).read_text())
    model_dir = folder / MODEL
    summary = finished_training(model_dir, run.config)
    step = None if summary is not None else interrupted_training(model_dir, run.config)
    if summary is None and step is None and folder.exists():
        shutil.rmtree(folder)  # a half-finished run of another config, or one with no checkpoint yet
    if train_only and summary is not None:
        return None
    with run_output(folder, run.run_id):
        return _train_and_analyse(run, study, folder, summary, step, progress, train_only)


def _train_and_analyse(run: Run, study: Study, folder: Path, summary: dict | None, step: int | None,
                       progress: bool, train_only: bool = False) -> dict | None:
    """`execute_run` once the run's folder is sorted out: `summary` of a finished training of this config to
    analyse, else `step` of an interrupted one to resume, else neither (train from step 0)."""
    tc = run.config
    model_dir = folder / MODEL
    (folder / ERROR).unlink(missing_ok=True)
    loaded = summary is not None
    if step is not None:
        print(f"run {run.run_id}: its training stopped after step {step} of {tc.steps}; going on from there")
        seed_everything(run.seed)  # the checkpoint restores every generator it uses
        try:
            summary = train(tc, model_dir, resume=True, progress=progress)
        except CheckpointError as e:  # a damaged checkpoint: nothing in it to keep
            print(f"run {run.run_id}: cannot go on from its checkpoint ({e.problem}); training again from step 0")
            shutil.rmtree(model_dir)
    if summary is None:
        seed_everything(run.seed)
        summary = train(tc, model_dir, resume=False, progress=progress)
    if train_only:
        return None
    threads = torch.get_num_threads()
    model = MultimodalModel.from_pretrained(model_dir, map_location=tc.device)
    untrained = initial_model(tc, model, len(summary.get("restarts", [])))  # its step 0: baseline, snapshot 0
    final = analyse_model(model, tc, study, progress=progress, untrained=untrained)
    snapshots = []
    for step in study.snapshots:
        if step == tc.steps:
            s = {k: final[k] for k in ("matching", "grounding", "redundancy", "summary", "timing")}
        else:
            m = (untrained if step == 0 else
                 MultimodalModel.from_pretrained(model_dir / "snapshots" / f"step_{step}", map_location=tc.device))
            s = analyse_model(m, tc, study, progress=progress, importance=False, untrained=untrained)
            s.pop("heads")
        snapshots.append({"step": step, **s})
    history = [{k: v for k, v in h.items() if k != "elapsed_s"} for h in summary.get("history", [])]
    result = {
        "format": RESULT_FORMAT, "run_id": run.run_id, "group": run.group, "point": dict(run.point),
        "seed": run.seed, "fingerprint": fingerprint(run, study), "config": run.config.to_dict(),
        "fusion_params": sum(p.numel() for p in model.fusion.parameters()),
        "query": model.cfg.query, "attention": model.cfg.attention,
        "train": {"steps": summary["steps"], "history": history, "loaded": loaded,
                  "restarts": summary.get("restarts", [])},  # stalled starts before the one kept
        **{k: final[k] for k in ("matching", "grounding", "heads", "redundancy", "importance", "summary")},
        "snapshots": snapshots,
        "timing": {"train_s": summary["wall_time_s"], **final["timing"], "threads": threads,
                   "train_device": summary.get("config", {}).get("device", tc.device)},  # where it trained
    }
    write_done(folder, result)
    return result


def write_done(folder: Path, result: dict) -> None:
    """A run's done.json, written whole or not at all; its error.txt from an earlier try goes."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (DONE + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(folder / DONE)
    (folder / ERROR).unlink(missing_ok=True)


def without_timing(result: dict) -> dict:
    """A run's results minus wall-clock numbers and how it was executed: what "the same config and
    seed give the same numbers" compares."""
    out = json.loads(json.dumps(result))
    out.pop("timing", None)
    out["train"].pop("loaded", None)
    for key in RUN_ONLY_KEYS:
        out["config"].pop(key, None)
    for s in out.get("snapshots", []):
        s.pop("timing", None)
    return out


def reuse_index(folders) -> dict[str, Path | ReportedRun]:
    """fingerprint -> finished run, over `folders` (study output folders, their `runs/` folders, or report
    folders such as multimodal/studies/reports/NAME): where a run of this study was already computed. A run
    folder (checkpoint and all) comes first; a run known only from a report's results.json second."""
    index: dict[str, Path | ReportedRun] = {}
    folders = list(map(Path, folders))
    holding = set()  # the folders with a finished run in them (an earlier folder may hold the same runs)
    for folder in folders:
        if not folder.is_dir():
            raise InputError(f"--reuse {folder}: no such folder (give another study's output or report folder)")
        for done in sorted([*folder.glob(f"runs/*/{DONE}"), *folder.glob(f"*/{DONE}")]):
            try:
                index.setdefault(json.loads(done.read_text())["fingerprint"], done.parent)
            except (OSError, json.JSONDecodeError, KeyError):
                continue  # a damaged or foreign file: not reusable, and not ours to touch
            holding.add(folder)
    for folder in folders:
        report = folder / "results.json"
        try:
            data = json.loads(report.read_text())
            found = [(r["fingerprint"], r) for r in data["runs"] if r.get("format") == RESULT_FORMAT]
            name = data.get("study", {}).get("name")
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue  # none, damaged or foreign
        for fp, record in found:
            index.setdefault(fp, ReportedRun(report, record, name))
            holding.add(folder)
    for folder in folders:
        if folder not in holding:
            print(f"note: --reuse {folder}: no finished run there (neither runs/*/{DONE} nor a readable "
                  "results.json): nothing to copy from it")
    return index


def copy_run(source: Path | ReportedRun, run: Run, study: Study, runs_dir: Path) -> dict:
    """A finished run of the same fingerprint, copied in as this study's run: another study's run folder
    (checkpoint included), or a reported run's results alone (no checkpoint: enough for the report, and a
    later change of analysis settings trains it again). done.json is relabelled with this run's id, group and
    grid point, and where it came from: `reused_from` when another study computed it, `carried_from` when
    this study did, in an earlier output (a lost machine's committed report, a grid run in parts). A run
    another study computed stays `reused_from` however often it is carried on."""
    reported = isinstance(source, ReportedRun)
    result = json.loads(json.dumps(source.record)) if reported else json.loads((source / DONE).read_text())
    where = source.report if reported else source
    if result.get("fingerprint") != fingerprint(run, study):
        raise InputError(f"{where} is not run {run.run_id} of this study (fingerprints differ)")
    folder = runs_dir / run.run_id
    if folder.exists():
        shutil.rmtree(folder)  # a half-finished try of this run: the copy replaces it
    if reported:
        folder.mkdir(parents=True)
        origin = f"{source.report.resolve()} ({result['run_id']})"
    else:
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns(DONE, DONE + ".tmp", ERROR))
        origin = str(source.resolve())
    result.update(run_id=run.run_id, group=run.group, point=dict(run.point))
    if copy_kind(source, study) == "carry":
        result.setdefault("carried_from", origin)  # where this study first computed it
    elif source_study(source) != study.name:
        result.pop("carried_from", None)
        result["reused_from"] = origin
    # else: this study's copy of another study's run, carried on: it keeps where it was copied from
    write_done(folder, result)
    return result


def copy_reusable(study: Study, runs: list[Run], runs_dir: Path, reuse) -> list[str]:
    """Copy in every run not done here that another study's output folder (`reuse`) finished with the same
    fingerprint; returns the copied run ids."""
    if not reuse:
        return []
    index = reuse_index(reuse)
    reused = []
    for r in runs:
        source = reusable_source(r, study, runs_dir, index)
        if source is not None:
            copy_run(source, r, study, runs_dir)
            reused.append(r.run_id)
    return reused


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _record_failure(runs_dir: str | Path, run_id: str) -> str:
    """The current exception's traceback, written to the run's error.txt and returned."""
    return write_error(Path(runs_dir) / run_id, traceback.format_exc())


def write_error(folder: Path, text: str) -> str:
    """A failed run's traceback in its error.txt; returns the text."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ERROR).write_text(text)
    return text


def _ray_job(run: Run, study: Study, runs_dir: str, threads: int) -> tuple[dict | None, str | None]:
    """One run as a Ray task: (its results, None) or (None, the traceback). Uses CUDA where the task runs
    when the node has it (the device is how a run executes, not part of what it computes)."""
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run = replace(run, config=replace(run.config, device=device, workers=min(run.config.workers, threads)))
    try:
        return execute_run(run, study, runs_dir, progress=False), None
    except Exception:
        return None, _record_failure(runs_dir, run.run_id)


def _worker_job(job: tuple) -> tuple[str, str | None]:
    run, study, runs_dir, train_only = job
    try:
        execute_run(run, study, runs_dir, progress=False, train_only=train_only)
        return run.run_id, None
    except Exception:  # one broken run must not take the others down: recorded, reported, exit code 1
        return run.run_id, _record_failure(runs_dir, run.run_id)


# ---------------------------------------------------------------------------------------
# A whole study
# ---------------------------------------------------------------------------------------


ENGINES = ("local", "ray")


OUTPUT_NAMES = ("study.json", "report.md", "results.csv", "results.json", "plots", "runs")  # what a study writes


def check_output_folder(study: Study, out: Path) -> None:
    """Refuse an output folder that holds other work, before anything is written: another study's results
    (its study.json, or its report's title, names another study) or files no study writes."""
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"{out} is a file: give the study a folder (--out)")
    try:
        owner = json.loads((out / "study.json").read_text())["name"]
    except FileNotFoundError:
        owner = None
    except (OSError, ValueError, KeyError, TypeError):
        owner = "(unreadable study.json)"
    if owner is None and (out / "report.md").is_file():
        title = (out / "report.md").read_text(errors="replace").split("\n", 1)[0]
        owner = title.removeprefix("# Study: ").strip() if title.startswith("# Study: ") else None
    if owner is not None and owner != study.name:
        raise InputError(f"{out} holds the results of study {owner!r}: choose another --out for study "
                         f"{study.name!r} (nothing was changed)")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_NAMES)
    if owner is None and foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InputError(f"{out} holds files that are not a study's output ({listed}): choose a new or empty folder "
                         f"for study {study.name!r} (nothing was changed)")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the system has one (`taskset -c 0-3 multimodal
    compare ...` gives a study four cores, so studies side by side do not oversubscribe), else every core."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def run_study(study: Study | str | Path, out: str | Path | None = None, workers: int = 1, progress: bool = True,
              report: bool = True, engine: str = "local", address: str | None = None, cpus_per_run: float = 1,
              gpus_per_run: float = 0, reuse=(), train_only: bool = False, seeds=None) -> dict:
    """Run every run of a study that is not done yet, then write the report.

    `study` is a `Study`, a TOML path or a shipped study's name; `out` the report folder
    (default `reports/<name>`). With `workers` > 1 independent runs go to that many
    spawned processes (a fresh one per run), each with `usable_cores() // workers` torch threads.
    `engine="ray"`: each run is a Ray task asking for `cpus_per_run` CPUs (its torch threads) and
    `gpus_per_run` GPUs, on the cluster at `address` or a local Ray instance (`multimodal.compare.cluster`);
    `workers` is then unused (the cluster's free resources decide how many run at once). `reuse`: other studies'
    output folders; a pending run whose fingerprint (config and evaluation settings) matches one of
    their finished runs is copied from there instead of computed again. `train_only` (local engine): train
    the pending runs and stop, with no evaluation, analysis or report; a later call (here, or where their
    runs/<id>/model folders are copied) analyses them without training again. `seeds`: run only the pending
    runs of these seeds (some of the study's), and leave the rest pending: a study split between processes or
    machines (one per core with `taskset`, each its own seeds, the same `out`); the report covers every run
    finished in `out`, so the last part to end writes the whole study's. Returns
    `{"runs": [done.json results in plan order], "ran": [...], "skipped": [...], "reused": [...],
    "left": [pending runs of other seeds], "failed": {run_id: traceback}, "report": {name: path}}`.
    """
    if not isinstance(study, Study):
        study = load_study(study)
    if workers < 1:
        raise InputError(f"workers = {workers} must be >= 1")
    if engine not in ENGINES:
        raise InputError(f"engine = {engine!r}: choose one of {', '.join(ENGINES)}")
    if train_only and engine != "local":
        raise InputError("--train-only works with the local engine: a Ray task's model stays on the node that "
                         "trained it")
    if seeds is not None:
        seeds = set(seeds)
        if not seeds or not seeds <= set(study.seeds):
            raise InputError(f"seeds {sorted(seeds)}: give some of study {study.name}'s seeds "
                             f"({', '.join(map(str, study.seeds))})")
    out = Path(out or Path("reports") / study.name)
    runs = plan_runs(study)  # every config checked before anything is created
    check_output_folder(study, out)
    runs_dir = out / "runs"
    reused = copy_reusable(study, runs, runs_dir, reuse)
    status = {r.run_id: run_status(r, study, runs_dir) for r in runs}
    pending = [r for r in runs if status[r.run_id] != "done"]
    left = [r.run_id for r in pending if seeds is not None and r.seed not in seeds]
    pending = [r for r in pending if r.run_id not in left]
    skipped = [r.run_id for r in runs if status[r.run_id] == "done" and r.run_id not in reused]
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study.to_dict(), indent=1))
    failed: dict[str, str] = {}
    bar = tqdm(total=len(runs) - len(left), initial=len(skipped) + len(reused), desc=f"study {study.name}: runs", disable=not progress,
               position=0)
    if skipped and progress:
        bar.write(f"{len(skipped)} of {len(runs)} runs already done: skipped")
    if reused and progress:
        bar.write(f"{len(reused)} of {len(runs)} runs copied from an identical finished run (--reuse): {', '.join(reused)}")
    cores = usable_cores()
    if engine == "ray" and pending:
        from multimodal.compare.cluster import run_tasks  # Ray: an optional extra

        def on_result(run_id: str, returned: tuple[dict | None, str | None]) -> None:
            result, error = returned
            if error is None:
                write_done(runs_dir / run_id, result)  # also when the task ran on a node with its own disk
                bar.write(f"run {run_id} done")
            else:
                failed[run_id] = write_error(runs_dir / run_id, error)  # also when the task ran elsewhere
                bar.write(f"run {run_id} FAILED (traceback in {runs_dir / run_id / ERROR})")
            bar.update(1)

        threads = max(1, int(cpus_per_run))
        run_tasks(_ray_job, [(r.run_id, (r, study, str(runs_dir.resolve()), threads)) for r in pending], on_result,
                  address=address, cpus=cpus_per_run, gpus=gpus_per_run)
    elif workers == 1 or len(pending) <= 1:
        for run in pending:
            bar.set_postfix_str(run.run_id)
            try:
                execute_run(run, study, runs_dir, progress=progress, train_only=train_only)
            except Exception:
                failed[run.run_id] = _record_failure(runs_dir, run.run_id)
                bar.write(f"run {run.run_id} FAILED (traceback in {runs_dir / run.run_id / ERROR})")
            bar.update(1)
    else:
        n = min(workers, len(pending))
        threads = max(1, cores // n)
        jobs = [(replace(r, config=replace(r.config, workers=min(r.config.workers, threads))), study, runs_dir,
                 train_only) for r in pending]
        # one process per run: a run's memory (the default's scene pool holds about 7 GB by its end) goes back
        # to the system when the run ends, not kept by an idle worker while the last runs train
        with ProcessPoolExecutor(n, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(threads,), max_tasks_per_child=1) as pool:
            for future in as_completed([pool.submit(_worker_job, job) for job in jobs]):
                run_id, error = future.result()
                if error:
                    failed[run_id] = error
                    bar.write(f"run {run_id} FAILED (traceback in {runs_dir / run_id / ERROR})")
                else:
                    bar.write(f"run {run_id} {'trained' if train_only else 'done'}")
                bar.update(1)
    bar.close()
    results = finished_results(study, runs, runs_dir)
    paths = report_from(study, results, runs, out) if report and not train_only else {}
    return {"runs": results, "ran": [r.run_id for r in pending if r.run_id not in failed], "skipped": skipped,
            "reused": reused, "left": left, "failed": failed, "report": paths}


def finished_results(study: Study, runs: list[Run], runs_dir: Path) -> list[dict]:
    """The done.json results of the runs that are done (current fingerprint), in plan order; a result from
    before runs recorded their stalled starts takes them from its model's own training summary, when kept."""
    results = []
    for run in runs:
        if run_status(run, study, runs_dir) == "done":
            result = json.loads((runs_dir / run.run_id / DONE).read_text())
            if "restarts" not in result["train"]:  # only then is the training summary read
                summary = finished_training(runs_dir / run.run_id / MODEL, run.config)
                if summary is not None:
                    result["train"]["restarts"] = summary.get("restarts", [])
            results.append(result)
    return results


def report_from(study: Study, results: list[dict], runs: list[Run], out: Path) -> dict[str, Path]:
    from multimodal.compare.report import write_report  # matplotlib: only when a report is written

    return write_report(study, results, out, planned=[r.run_id for r in runs])
