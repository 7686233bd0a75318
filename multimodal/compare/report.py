"""The report of a comparison study: report.md, results.csv and results.json (the plots are
`plots`). Input: the study and its runs' `done.json` results, read through `summary`.
Conclusions are generated from the numbers and claim only what they support: two settings are
called different only when the seed-matched (paired) difference passes a two-sided t-test at 95%
with n - 1 degrees of freedom; otherwise the report says "no difference beyond seed noise". Runs
are paired by seed and by the other grid values, so each pair saw the same training scenes and
every run is evaluated on the same held-out scenes.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from multimodal.compare.plots import plot_attention_kinds, plot_dynamics, plot_heads, plot_size, plot_summary
from multimodal.compare.summary import (BASELINE_SOURCES, DYNAMICS, HEAD_COLUMNS, METRICS, MODALITIES,
                                        OUTCOME_METRICS, SIZE_METRICS, TIMING, Group,
                                        baseline_pointing_best, grounds, group_runs, mean_std, pointing_best,
                                        pointing_best_strict, sizes_differ, snapshot_series, value)

# two-sided 95% critical values of Student's t by degrees of freedom (the largest tabulated df <= df is used)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


# ---------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------


def fmt_ms(values: Sequence[float | None], fmt: str) -> str:
    m, s, n = mean_std(values)
    if n == 0:
        return "n/a"
    return f"{m:{fmt}}" if n == 1 else f"{m:{fmt}} ± {s:{fmt.lstrip('+')}}"


def t_critical(df: int) -> float:
    keys = [k for k in T95 if k <= df]
    return T95[max(keys)] if keys else math.inf


TIED = 1e-9  # paired differences whose spread is below this (relative) are equal: float rounding, not seeds


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired comparison b - a: mean, std, n, t, the 95% critical value and the verdict."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    n = len(d)
    out = {"n": n, "a_mean": float(np.mean(a)) if n else math.nan, "b_mean": float(np.mean(b)) if n else math.nan,
           "a_std": float(np.std(a, ddof=1)) if n > 1 else math.nan,
           "b_std": float(np.std(b, ddof=1)) if n > 1 else math.nan,
           "diff_mean": float(d.mean()) if n else math.nan, "diff_std": float(d.std(ddof=1)) if n > 1 else math.nan,
           "t": math.nan, "critical": t_critical(n - 1), "significant": False}
    if n > 1:
        if out["diff_std"] <= TIED * max(1.0, abs(out["diff_mean"])):  # equal differences, up to float rounding
            out["diff_std"] = 0.0
        se = out["diff_std"] / math.sqrt(n)
        out["t"] = (math.inf if out["diff_mean"] else 0.0) if se == 0 else out["diff_mean"] / se
        if se > 0:
            out["significant"] = abs(out["t"]) > out["critical"]
        elif out["diff_mean"]:
            # the same nonzero difference in every pair (a discrete metric: pointing moves in steps of one
            # phrase) leaves no spread for the t-test; an infinite t is not evidence. The exact sign test
            # takes over: every pair on one side has two-sided p = 2 / 2^n (< 0.05 from 6 pairs on)
            out["sign_p"] = min(1.0, 2.0 * 0.5 ** n)
            out["significant"] = out["sign_p"] < 0.05
    return out



def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _fmt_level(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _is_numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _others(run: dict, key: str) -> str:
    """The run's grid values other than `key`: runs that differ only in `key` share it."""
    return json.dumps({k: v for k, v in run["point"].items() if k != key}, sort_keys=True)


def _pairs(results: list[dict], key: str, a: Any, b: Any, metric: str) -> tuple[list[float], list[float]]:
    """Metric values of runs with key=a and key=b, matched on the seed and every other grid value."""
    at_b = {(_others(r, key), r["seed"]): r for r in results if r["point"].get(key) == b}
    return _both_present((value(r, metric), value(at_b[_others(r, key), r["seed"]], metric))
                         for r in results if r["point"].get(key) == a and (_others(r, key), r["seed"]) in at_b)


def _level_means(results: list[dict], key: str, a: Any, b: Any, levels: Sequence[Any], metric: str,
                 fmt: str) -> str:
    """Each level's mean of `metric` over the runs that share their other grid values with the a-b pairs (in
    a [zip] such as layers 1/2/4 at 4 heads beside heads 2/4/8 at 2 layers, the heads=4 mean is the 2-layer
    runs', not a pool over every depth)."""
    shared = ({_others(r, key) for r in results if r["point"].get(key) == a}
              & {_others(r, key) for r in results if r["point"].get(key) == b})
    out = []
    for v in sorted(levels):
        m, _, n = mean_std([value(r, metric) for r in results
                            if r["point"].get(key) == v and _others(r, key) in shared])
        out.append(f"{_fmt_level(v)}: {m:{fmt.lstrip('+')}}" if n else f"{_fmt_level(v)}: n/a")
    return ", ".join(out)


def _both_present(pairs) -> tuple[list[float], list[float]]:
    """The (a, b) pairs where both values exist, as two lists."""
    kept = [(a, b) for a, b in pairs if a is not None and b is not None]
    return [a for a, _ in kept], [b for _, b in kept]


def _sentence(label: str, fmt: str, test: dict, what_b: str, what_a: str, prep: str = "with",
              pairs: str = "seed-matched pairs") -> str | None:
    """One conclusion in words: b against a, claimed only when the paired test passes."""
    n = test["n"]
    if n == 0:
        return None
    f2 = fmt.lstrip("+")
    if n == 1:
        return (f"{label}: {test['b_mean']:{f2}} {prep} {what_b} vs {test['a_mean']:{f2}} {prep} {what_a}, from one "
                f"{pairs[:-1]} only: no estimate of seed noise, so no conclusion.")
    if test["diff_std"] == 0 and test["diff_mean"] == 0:
        return f"{label}: the same {prep} {what_b} as {prep} {what_a} in all {n} {pairs} ({test['a_mean']:{f2}})."
    if test["diff_std"] == 0:
        word = "higher" if test["diff_mean"] > 0 else "lower"
        same = (f"by the same {test['diff_mean']:+{f2}} in all {n} {pairs} ({test['b_mean']:{f2}} vs "
                f"{test['a_mean']:{f2}}; no spread between seeds for a t-test; sign test p = {test['sign_p']:.3f}")
        if test["significant"]:
            return f"**{label} was {word} {prep} {what_b} than {prep} {what_a}** {same} < 0.05)."
        return f"{label}: {word} {prep} {what_b} than {prep} {what_a} {same} >= 0.05), so no conclusion."
    both = (f"{test['b_mean']:{f2}} ± {test['b_std']:{f2}} vs {test['a_mean']:{f2}} ± {test['a_std']:{f2}}; "
            f"paired difference {test['diff_mean']:+{f2}} ± {test['diff_std']:{f2}} over {n} {pairs}, "
            f"|t| = {abs(test['t']):.1f}")
    if test["significant"]:
        word = "higher" if test["diff_mean"] > 0 else "lower"
        return f"**{label} was {word} {prep} {what_b} than {prep} {what_a}** ({both} > {test['critical']:.2f})."
    return (f"{label}: no difference beyond seed noise between {what_b} and {what_a} "
            f"({both} <= {test['critical']:.2f}).")


ZIP_ROWS = "[zip] rows"  # the factor a report compares when some of a [zip]'s keys never vary alone


def zip_label(keys: Sequence[str], values: Sequence[Any]) -> str:
    return ", ".join(f"{k}={_fmt_level(v)}" for k, v in zip(keys, values))


def zip_row(result: dict, keys: Sequence[str]) -> dict:
    """A run's result with its [zip] keys folded into one grid value (`ZIP_ROWS`: the row's label)."""
    point = {k: v for k, v in result["point"].items() if k not in keys}
    point[ZIP_ROWS] = zip_label(keys, [result["point"][k] for k in keys])
    return {**result, "point": point}


def _grounded(results: list[dict], threshold: float) -> list[dict]:
    """The runs whose models ground (or have no strict reading to tell, e.g. latent queries)."""
    return [r for r in results if grounds(r, threshold) is not False]


def factor_conclusions(results: list[dict], grid: dict[str, Sequence[Any]],
                       threshold: float = 0.0) -> tuple[list[str], list[dict], int]:
    """Per grid key: compare its levels on every metric, paired by seed and the other grid values.

    Grounding and matching (`OUTCOME_METRICS`) are compared over every run, so a level whose models do not
    ground shows it; head specialisation only over pairs where both runs ground at `threshold`. Numeric keys
    compare the lowest with the highest level measured (levels no run has, as in a study reported in part,
    are left out) and list every level's mean there; with more than two levels they also compare each level
    with the next (layers 1 -> 2 and 2 -> 4: where along the scale a change happens). Other keys compare each
    level with the first one listed.
    Returns sentences, the tests as records (with the runs they used: "all" or "grounded"), and the number
    of tests made.
    """
    lines, records, tests = [], [], 0
    grounded = _grounded(results, threshold)
    for key, levels in grid.items():
        if len(levels) < 2:
            continue
        numeric = _is_numeric(levels)
        if numeric:  # the levels some run has, once each (a [zip] lists a level once per row)
            steps = sorted({v for v in levels if any(r["point"].get(key) == v for r in results)})
            comparisons = [(steps[0], steps[-1])] if len(steps) > 1 else []
            if len(steps) > 2:
                comparisons += list(zip(steps, steps[1:]))
        else:
            comparisons = [(levels[0], b) for b in levels[1:]]
        lines += ["", f"### {key}", ""]
        not_compared: dict[tuple, list[str]] = {}
        for metric, label, fmt in METRICS:
            outcome = metric in OUTCOME_METRICS
            runs = results if outcome else grounded
            for a, b in comparisons:
                xa, xb = _pairs(runs, key, a, b, metric)
                if not xa:
                    if _pairs(results, key, a, b, metric)[0]:  # measured, but no pair where both runs ground
                        not_compared.setdefault((a, b), []).append(label)
                    continue
                test = paired_test(xa, xb)
                tests += test["n"] > 1
                records.append({"key": key, "metric": metric, "a": a, "b": b,
                                "runs": "all" if outcome else "grounded", **test})
                s = _sentence(label[0].upper() + label[1:], fmt, test, f"{key}={_fmt_level(b)}",
                              f"{key}={_fmt_level(a)}",
                              pairs="grounded pairs" if threshold > 0 and not outcome else "seed-matched pairs")
                if s and numeric and len(steps) > 2 and (a, b) == comparisons[0]:
                    which = " (grounded runs)" if threshold > 0 and not outcome else ""
                    s += f" Mean by level{which}: {_level_means(runs, key, a, b, steps, metric, fmt)}."
                if s:
                    lines.append(f"- {s}")
        for (a, b), labels in not_compared.items():
            lines.append(f"- Not compared between {key}={_fmt_level(a)} and {key}={_fmt_level(b)}, as no seed has "
                         f"both runs grounding: {', '.join(labels)}.")
        if lines[-2] == f"### {key}":
            lines.append("- no metric was measured at two levels of this key")
    return lines, records, tests


def factor_sections(results: list[dict], grid: dict[str, Sequence[Any]],
                    zipped: Mapping[str, Sequence[Any]], threshold: float = 0.0) -> tuple[list[str], list[dict], int]:
    """`factor_conclusions` per key, where a [zip] key that never varies alone (no two runs differ in it
    and nothing else) is left out of the per-key sections and the [zip]'s rows are compared instead, each
    with the first (`ZIP_ROWS`), beside the keys that can be compared alone."""
    per_key = {k: factor_conclusions(results, {k: v}, threshold) for k, v in grid.items()}
    zkeys = list(zipped)
    together = [k for k in zkeys if not per_key[k][1]] if len(zkeys) > 1 else []
    sections = [per_key[k] for k in grid if k not in together]
    if together:
        rows = {ZIP_ROWS: [zip_label(zkeys, row) for row in zip(*(zipped[k] for k in zkeys))]}
        sections.append(factor_conclusions([zip_row(r, zkeys) for r in results], rows, threshold))
    return ([line for lines, _, _ in sections for line in lines], [rec for _, recs, _ in sections for rec in recs],
            sum(n for _, _, n in sections))


def size_lines(results: list[dict], threshold: float = 0.0) -> list[str]:
    """Descriptive: correlation of log fusion parameter count with grounding and matching (every run) and
    with entropy (the runs that ground)."""
    params = {r["fusion_params"] for r in results}
    if not sizes_differ(params):
        return []
    lines, grounded = [], _grounded(results, threshold)
    for metric, label, _ in [m for m in METRICS if m.key in SIZE_METRICS]:
        runs = results if metric in OUTCOME_METRICS else grounded
        used = [r for r in runs if value(r, metric) is not None]
        xs, ys = [math.log10(r["fusion_params"]) for r in used], [value(r, metric) for r in used]
        if len(set(xs)) < 2 or len(xs) < 3 or np.std(ys) == 0:
            continue
        rho = float(np.corrcoef(xs, ys)[0, 1])
        which = "grounded runs" if threshold > 0 and runs is grounded else "runs"
        lines.append(f"- {label[0].upper() + label[1:]} vs log10(fusion parameters): Pearson r = {rho:+.2f} over "
                     f"{len(xs)} {which} ({min(r['fusion_params'] for r in used):,} to "
                     f"{max(r['fusion_params'] for r in used):,} parameters). Descriptive only: the paired "
                     "comparisons above are the test.")
    return lines


def baseline_lines(results: list[dict]) -> tuple[list[str], int]:
    lines, tests = [], 0
    baselines = (("uniform", "a uniform map (chance)", "the uniform map"),
                 ("random_init", "the same model untrained (its own initial weights)", "its untrained self"))
    for mod in MODALITIES:
        for source, long_name, short_name in baselines:
            xa, xb = _both_present((value(r, baseline_pointing_best(source, mod)), value(r, pointing_best(mod)))
                            for r in results)
            if not xa:
                continue
            test = paired_test(xa, xb)
            tests += test["n"] > 1
            above = sum(b > a for a, b in zip(xa, xb))
            s = _sentence(f"Best-head pointing ({mod})", ".3f", test, "the trained heads", long_name,
                          prep="for", pairs="runs")
            lines.append(f"- {s} The best head beat {short_name} in {above} of {len(xa)} runs.")
    if lines:
        lines.append("- The best head is picked on the same scenes it is scored on, out of layers x heads "
                     "candidates, so best-head pointing is optimistic; the per-head tables give every head.")
    return lines, tests


def run_seconds(run: dict) -> float:
    """A run's compute: training, evaluation and analysis of the final model and of every snapshot."""
    t = run.get("timing", {})
    total = sum(t.get(k) or 0.0 for k in ("train_s", "eval_s", "analysis_s"))
    for snap in run.get("snapshots", []):
        if snap["step"] != run["train"]["steps"]:  # the final model's numbers are counted above
            total += sum(snap.get("timing", {}).get(k) or 0.0 for k in ("eval_s", "analysis_s"))
    return total


def _among(loaded: list[dict]) -> str:
    """Which of the runs that reused a training the compute line also counts as copied or carried over, so
    that its counts do not read as adding up: ' (of these, 3 among the copied runs below)'."""
    parts = [f"{n} among the {what} runs" for n, what in ((sum("reused_from" in r for r in loaded), "copied"),
                                                          (sum("carried_from" in r for r in loaded), "carried-over"))
             if n]
    return f" (of these, {' and '.join(parts)} below)" if parts else ""


def compute_line(results: list[dict]) -> str:
    seconds = [run_seconds(r) for r in results]
    threads = sorted({r.get("timing", {}).get("threads") for r in results} - {None})
    devices = sorted({r["config"].get("device", "cpu") for r in results})
    loaded = [r for r in results if r["train"].get("loaded")]
    reused = len(loaded)
    elsewhere = Counter(f"{r['timing']['train_device']} and analysed on {r['config'].get('device', 'cpu')}"
                        for r in results if r.get("timing", {}).get("train_device", r["config"].get("device", "cpu"))
                        != r["config"].get("device", "cpu"))
    copied = sum("reused_from" in r for r in results)
    carried = sum("carried_from" in r for r in results)
    return (f"**Compute.** {sum(seconds) / 60:.1f} min of run time in all (training, evaluation and analysis, "
            f"summed over the runs; {min(seconds) / 60:.1f} to {max(seconds) / 60:.1f} min per run), with "
            f"{'/'.join(map(str, threads)) or '?'} torch thread(s) per run on {'/'.join(devices)}"
            + (f"; {reused} run(s) reused an earlier training of the same config{_among(loaded)}"
               if reused else "")
            + "".join(f"; {n} run(s) trained on {where}" for where, n in sorted(elsewhere.items()))
            + (f"; {copied} run(s) copied from another study's run of the same config and evaluation (--reuse; "
               "their time is counted here as well)" if copied else "")
            + (f"; {carried} run(s) computed earlier by this study and carried over from that output (--reuse)"
               if carried else "")
            + ". Runs in parallel (--workers, --engine ray) take less wall time than this sum.")


def grounding_lines(results: list[dict], grid_keys: list[str], threshold: float) -> list[str]:
    """The report's first table: each run's grounding (best-head pointing, strict and tolerant, per modality)
    and whether it counts as grounded, then which runs the conclusions leave out."""
    header = ["run", *grid_keys, "seed", "matching"]
    for mod in MODALITIES:
        header += [f"{mod} strict", f"{mod} tolerant"]
    header.append(f"grounds (strict >= {threshold:g} on each scored)")
    starts = any("restarts" in r.get("train", {}) for r in results)  # recorded since 2026-12-06
    if starts:
        header.append("starts")
    rows, left_out = [], []
    for r in results:
        g = grounds(r, threshold)
        if g is False:
            left_out.append(r["run_id"])
        cells = [r["run_id"], *[_fmt_level(r["point"].get(k)) for k in grid_keys], str(r["seed"])]
        for key in ["matching_accuracy"] + [k for m in MODALITIES for k in (pointing_best_strict(m), pointing_best(m))]:
            v = value(r, key)
            cells.append("n/a" if v is None else f"{v:.3f}")
        cells.append({True: "yes", False: "**no**", None: "n/a"}[g])
        if starts:
            restarts = r.get("train", {}).get("restarts")
            cells.append("?" if restarts is None else str(1 + len(restarts)))
        rows.append(cells)
    L = ["## Grounding per run", "",
         "Best-head pointing on the evaluation scenes: strict (the map's peak on the object / inside the event) "
         "and tolerant (within one patch / one column of it). A run grounds when its strict pointing is >= "
         f"{threshold:g} on each modality it is scored on (both, unless its captions name one modality only: "
         "the other is n/a). The conclusions compare grounding and matching over every run, and head "
         "specialisation (entropy, sqrt-JS, modality focus, Shapley share) only between runs that both ground (a "
         "run with no strict reading, e.g. latent queries, is kept).", ""]
    L += _md_table(header, rows) + [""]
    if starts:
        L += ["*starts*: how often the run's training began. A start whose loss is still above the recipe's "
              "`stall_loss` at `stall_step` begins again from fresh weights and data draws (at most "
              "`stall_restarts` times); the last start is the model reported, its untrained baseline that start's "
              "step 0. ? = not recorded (a run from before 2026-12-06, e.g. copied with --reuse).", ""]
    if left_out:
        L += [f"**Left out of the conclusions about heads ({len(left_out)} of {len(results)} runs do not ground):** "
              f"{', '.join(left_out)}. Their numbers stay in the tables and in the tests of grounding and matching; "
              "the tests of head specialisation skip them (and their partners).", ""]
    return L


def dynamics_lines(groups: list[Group]) -> tuple[list[str], list[dict], int]:
    """First against last snapshot, each run paired with itself, per grid point."""
    lines, records, tests = [], [], 0
    for g in groups:
        runs = [r for r in g.runs if len(r.get("snapshots", [])) >= 2]
        if not runs:
            continue
        first, last = runs[0]["snapshots"][0]["step"], runs[0]["snapshots"][-1]["step"]
        prefix = f"[{g.label}] " if len(groups) > 1 else ""
        for key, label, _ in DYNAMICS:
            xa, xb = _both_present((r["snapshots"][0]["summary"].get(key), r["snapshots"][-1]["summary"].get(key))
                            for r in runs)
            if not xa:
                continue
            test = paired_test(xa, xb)
            tests += test["n"] > 1
            records.append({"group": g.label, "metric": key, "from_step": first, "to_step": last, **test})
            s = _sentence(label[0].upper() + label[1:], ".3f", test, f"step {last}", f"step {first}", prep="at",
                          pairs="runs")
            lines.append(f"- {prefix}{s}")
    return lines, records, tests


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
            ["| " + " | ".join(r) + " |" for r in rows])


def write_csv(results: list[dict], grid_keys: list[str], path: Path) -> Path:
    summary_keys = sorted({k for r in results for k in r["summary"]})
    timing_keys = sorted({k for r in results for k in r.get("timing", {})})
    header = (["run_id", "group", "seed"] + grid_keys + ["fusion_params", "query", "attention", "steps"] +
              summary_keys + timing_keys)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in results:
            w.writerow([r["run_id"], r["group"], r["seed"]] + [r["point"].get(k) for k in grid_keys] +
                       [r["fusion_params"], r["query"], r["attention"], r["train"]["steps"]] +
                       [r["summary"].get(k) for k in summary_keys] + [r["timing"].get(k) for k in timing_keys])
    return path


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_report(study, results: list[dict], out: str | Path, planned: Sequence[str] | None = None) -> dict[str, Path]:
    """report.md, plots/*.png, results.csv and results.json in `out`. Returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(results)
    grid = study.factors
    grid_keys = list(grid)
    paths: dict[str, Path] = {}

    # plots
    plots = out / "plots"
    head_plots = {r["run_id"]: plot_heads(r, plots / "heads" / f"{r['run_id']}.png") for r in results}
    for stale in (plots / "heads").glob("*.png"):  # runs of an earlier report that this one does not hold
        if stale.stem not in head_plots:
            stale.unlink()
    for name, p in (("summary", plot_summary(groups, plots / "summary.png")),
                    ("grounding_vs_size", plot_size(groups, plots / "grounding_vs_size.png")),
                    ("training_dynamics", plot_dynamics(groups, plots / "training_dynamics.png")),
                    ("dense_vs_sparse", plot_attention_kinds(results, plots / "dense_vs_sparse.png"))):
        if p is not None:
            paths[name] = p
        else:  # not drawn for these runs: a file left by an earlier report would be stale
            (plots / f"{name}.png").unlink(missing_ok=True)

    # grounding and matching: compared over every run; head specialisation: over the runs whose models ground
    threshold = getattr(study, "grounded_pointing", 0.0)
    factor, factor_records, n_tests = factor_sections(results, grid, getattr(study, "zipped", None) or {},
                                                      threshold)
    base, n_base = baseline_lines(results)
    dyn, dyn_records, n_dyn = dynamics_lines(groups)
    size = size_lines(results, threshold)
    n_tests += n_base + n_dyn

    L: list[str] = [f"# Study: {study.name}", ""]
    if study.question:
        L += [f"**Question.** {study.question}", ""]
    steps = sorted({r["train"]["steps"] for r in results})
    n_planned = len(planned) if planned is not None else len(results)
    n_points = len(study.points()) if planned is not None else len(groups)
    L += [f"**Setup.** {n_planned} runs ({_count(n_points, 'grid point')} x "
          f"{_count(len(study.seeds), 'seed')}: "
          f"{', '.join(map(str, study.seeds))}), trained {'/'.join(map(str, steps))} steps each"
          f" (base: {', '.join(f'{k} = {v}' for k, v in study.base.items()) or 'defaults'}). "
          f"Every run is evaluated on the same {study.eval_scenes} held-out scenes (split 'test', seed "
          f"{study.eval_seed}): matching accuracy against a one-attribute hard negative, and per-head "
          f"grounding (pointing game, energy inside the referent). Per-head metrics, JS redundancy and head "
          f"importance (zero-ablation, gradient, Shapley with {study.shapley_permutations} permutations; task "
          f"metric: mean margin of the true caption over its hard negative) use the first "
          f"{study.analysis_scenes} of those scenes.", ""]
    L += [compute_line(results), ""]
    if n_planned > len(results):
        missing = sorted(set(planned or []) - {r["run_id"] for r in results})
        L += [f"**Incomplete:** {len(results)} of {n_planned} runs finished; missing: {', '.join(missing)}. "
              "Numbers below cover the finished runs only.", ""]
    latents = sorted({r["query"] for r in results if r["grounding"] is None})
    if latents:
        L += [f"**No grounding for query = {', '.join(latents)}.** The grounding evaluation scores the rows of a "
              "referring phrase's text-token queries; these runs have no such queries, so they are compared on "
              "matching accuracy, entropy, redundancy and importance only (n/a in the grounding columns).", ""]

    L += grounding_lines(results, grid_keys, threshold)

    # main table
    metric_cols = [(k, t, f) for k, t, f in METRICS if any(value(r, k) is not None for r in results)]
    header = grid_keys + ["fusion params", "seeds"] + [t for _, t, _ in metric_cols] + [t for _, t, _ in TIMING]
    rows = [[_fmt_level(g.point.get(k)) for k in grid_keys] + [f"{g.fusion_params:,}", str(len(g.runs))] +
            [fmt_ms(g.values(k), f) for k, _, f in metric_cols] + [fmt_ms(g.values(k), f) for k, _, f in TIMING]
            for g in groups]
    L += ["## Results per grid point (mean ± std over seeds)", ""] + _md_table(header, rows) + [""]
    L += ["Matching accuracy: the true caption outscores a one-attribute hard negative. Pointing: the best head's "
          "pointing-game accuracy for the phrases' referents. Energy gain: mass inside the referent / the uniform "
          "map's, mean over heads. Entropy: normalised to [0, 1] (1 = uniform), mean over heads. sqrt-JS: mean "
          "distance between every pair of heads' maps (small = redundant heads). Image focus: per head, its image share "
          "(image and audio renormalised to sum to 1, text keys left out) minus the share a uniform head would "
          "give the image with the same key counts; the table gives the mean of its absolute value over heads "
          "(0 = every head splits its mass as chance would, however many tokens each modality has). Heads above "
          "uniform on image: the fraction of heads whose image focus is > 0. Top-head Shapley share: the "
          "largest |Shapley value| / the sum over heads (large = one head carries the task). Timings are "
          "wall-clock on the machine that ran the study.", ""]
    names = {"uniform": "uniform map", "random_init": "untrained (own initial weights)"}
    base_cols = [(baseline_pointing_best(src, mod), f"{names.get(src, src)} pointing ({mod})")
                 for mod in MODALITIES for src in BASELINE_SOURCES]
    base_cols = [(k, t) for k, t in base_cols if any(value(r, k) is not None for r in results)]
    if base_cols:
        L += ["### Grounding baselines (best 'head' of each baseline, same scenes)", ""]
        L += _md_table(grid_keys + [t for _, t in base_cols],
                       [[_fmt_level(g.point.get(k)) for k in grid_keys] + [fmt_ms(g.values(k), ".3f")
                                                                          for k, _ in base_cols] for g in groups])
        L += [""]

    L += ["## Conclusions", ""]
    if len(study.seeds) < 2:
        L += ["- One seed per grid point: there is no estimate of seed noise, so no difference below can be called "
              "real.", ""]
    if factor:
        L += factor + [""]
    if size:
        L += ["### Model size", ""] + size + [""]
    if base:
        L += ["### Grounding against chance and against untrained heads", ""] + base + [""]
    if dyn:
        L += ["### Over training", ""] + dyn + [""]
    if not (factor or base or dyn):
        L += ["- Nothing varies between the runs except the seed: there is nothing to compare.", ""]
    L += ["### How to read these", "",
          "- A difference is called real only when the seed-matched paired t-test passes at 95% (two-sided, n - 1 "
          "degrees of freedom)" + (f"; with {len(study.seeds)} seeds that needs a large, consistent effect"
                                   if len(study.seeds) > 1 else "") +
          ". 'No difference beyond seed noise' means these runs do not show a difference, not that there is none.",
          *([f"- Grounding and matching are compared over every run; head specialisation only between runs that "
             f"both ground (strict pointing >= {threshold:g}), so a level whose models do not ground gets no "
             "comparison of its heads."] if threshold > 0 else []),
          f"- This report makes {n_tests} such tests; at 95% about {n_tests / 20:.1f} of them could pass by chance.",
          f"- The numbers hold for this training budget ({'/'.join(map(str, steps))} steps); longer training can "
          "change them.", ""]

    if paths:
        L += ["## Plots", ""]
        captions = {"summary": "Every metric per grid point (bars: mean ± std over seeds; dots: seeds).",
                    "grounding_vs_size": "Grounding and matching against the fusion block's parameter count.",
                    "training_dynamics": "Metrics at the training snapshots (mean ± std over seeds).",
                    "dense_vs_sparse": "Attention kinds: grounding, entropy and evaluation cost (pooled over seeds "
                                       "and any other grid value)."}
        for name, p in paths.items():
            L += [f"**{name}.** {captions[name]}", "", f"![{name}]({p.relative_to(out).as_posix()})", ""]

    if dyn:
        L += ["## Training snapshots (mean ± std over seeds)", ""]
        keys = [(k, t) for k, t, _ in DYNAMICS if any(s["summary"].get(k) is not None
                                                   for r in results for s in r.get("snapshots", []))]
        for g in groups:
            series = {k: snapshot_series(g.runs, k) for k, _ in keys}
            steps = sorted({s["step"] for r in g.runs for s in r.get("snapshots", [])})
            L += [f"**{g.label}**", ""]
            L += _md_table(["step"] + [t for _, t in keys],
                           [[str(step)] + [fmt_ms(series[k].get(step, []), ".3f") for k, _ in keys]
                            for step in steps]) + [""]

    L += ["## Per-head tables", "",
          "One table per run: per-head metrics over the analysis scenes, grounding over the evaluation scenes, "
          "importance for the matching margin (ablation: margin lost when the head is zeroed; gradient: "
          "Michel et al., normalised; Shapley ± standard error). Heatmaps: `plots/heads/`.", ""]
    for r in results:
        cols = [(k, t, f) for k, t, f in HEAD_COLUMNS if any(h.get(k) is not None for h in r["heads"])]
        has_shap = any(h.get("shapley") is not None for h in r["heads"])
        header = ["L", "H"] + [t for _, t, _ in cols] + (["Shapley ± SE"] if has_shap else [])
        rows = []
        for h in r["heads"]:
            row = [str(h["layer"]), str(h["head"])]
            row += ["n/a" if h.get(k) is None else f"{h[k]:{f}}" for k, _, f in cols]
            if has_shap:
                se = h.get("shapley_stderr")
                row.append(f"{h['shapley']:+.3f} ± {se:.3f}" if se is not None and math.isfinite(se)
                           else f"{h['shapley']:+.3f}")
            rows.append(row)
        red = r["redundancy"]
        clusters = [c for c in red["clusters"] if len(c) > 1]
        imp = r.get("importance") or {}
        L += [f"<details><summary>{r['run_id']}</summary>", "",
              f"![heads]({head_plots[r['run_id']].relative_to(out).as_posix()})", ""]
        L += _md_table(header, rows) + [""]
        pair = " and ".join(red["most_similar_pair"] or []) or "n/a"
        groups_text = ", ".join("{" + ", ".join(c) + "}" for c in clusters) or "none (every head distinct)"
        L += [f"Redundancy: mean sqrt-JS distance {red['mean_distance']:.3f}; most similar heads {pair}; "
              f"clusters of heads closer than {red['threshold']}: {groups_text}."
              + (f" Margin with all heads {imp['margin_all_heads']:+.3f}, with none {imp['margin_no_heads']:+.3f}."
                 if imp else ""), "", "</details>", ""]

    L += ["## Files", "", "- `results.csv`: one row per run (the summary numbers and timings).",
          "- `results.json`: the study, every run's full results, the tests behind the conclusions.",
          "- `runs/<run id>/`: the checkpoint (`model/`) and `done.json` of each run.", ""]

    report = out / "report.md"
    report.write_text("\n".join(L))
    paths["report"] = report
    paths["csv"] = write_csv(results, grid_keys, out / "results.csv")
    data = {"study": study.to_dict(), "planned_runs": list(planned or []), "runs": results,
            "groups": [{"group": g.label, "point": g.point, "fusion_params": g.fusion_params,
                        "runs": [r["run_id"] for r in g.runs],
                        "mean": {k: mean_std(g.values(k))[0] for k, _, _ in METRICS + TIMING},
                        "std": {k: mean_std(g.values(k))[1] for k, _, _ in METRICS + TIMING}} for g in groups],
            "tests": {"factors": factor_records, "training": dyn_records},
            "conclusions": [line for line in factor + size + base + dyn if line.startswith("- ")]}
    (out / "results.json").write_text(json.dumps(_json_safe(data), indent=1))
    paths["json"] = out / "results.json"
    return paths
