"""`multimodal compare`: scripted comparison runs over a grid of configurations, and their report.

A study is a TOML file: the question it asks, the seeds, the evaluation budgets, `[base]`
`TrainConfig` overrides applied to every run, and a `[grid]` whose cartesian product (times
the seeds) gives the runs:

    name = "size"
    question = "Do larger fusion blocks have better-grounded, more specialised heads?"
    seeds = [0, 1, 2]
    eval_scenes = 200           # held-out scenes: matching accuracy and per-head grounding
    analysis_scenes = 64        # scenes for per-head metrics, redundancy and importance
    shapley_permutations = 20
    snapshots = [0, 100, 300]   # optional: also evaluate the model after these training steps
    [base]                      # TrainConfig overrides (dotted keys allowed) for every run
    preset = "default"
    steps = 300
    [grid]                      # cartesian product; TrainConfig fields or fusion.* / scene.*
    "fusion.dim" = [64, 128]
    "fusion.heads" = [2, 4]

Every run is checked before anything trains (unknown keys and bad values are refused by
name). Each run then trains (or loads a finished training of the same config), evaluates
on the same held-out scenes as every other run, and analyses its heads; its results go to
`OUT/runs/<run id>/done.json`, and a run whose done.json matches its config is skipped next
time. The report (`report.md`, PNG plots, `results.csv`, `results.json`) is written from the
finished runs.

One module per job: `study` (the study file, the runs, their fingerprints and status),
`analyse` (what is measured for one trained model), `runner` (running the runs here, in a
process pool, and writing done.json), `summary` (the metric keys and labels both sides use),
`report` (report.md, results.csv, results.json) and `plots` (the PNGs).

From Python:

    from multimodal.compare import load_study, plan_runs, run_study
    result = run_study("multimodal/studies/size.toml", "reports/size", workers=2)
"""

from multimodal.compare.analyse import (
    BATCH,
    AnalysisSet,
    analyse_model,
    head_importance,
    head_metrics,
    matching_only,
    seed_everything,
)
from multimodal.compare.runner import (
    check_output_folder,
    copy_reusable,
    execute_run,
    finished_results,
    report_from,
    run_study,
    without_timing,
)
from multimodal.compare.study import (
    DONE,
    ERROR,
    MODEL,
    NEUTRAL_FUSION_KEYS,
    NEUTRAL_KEYS,
    RESULT_FORMAT,
    RUN_ONLY_KEYS,
    STUDY_DIR,
    STUDY_KEYS,
    Run,
    Study,
    config_fields,
    describe_runs,
    fingerprint,
    load_study,
    plan_runs,
    point_label,
    run_name,
    run_status,
    shipped_studies,
    study_from_dict,
)
from multimodal.compare.summary import summarise

__all__ = [
    "BATCH", "DONE", "ERROR", "MODEL", "NEUTRAL_FUSION_KEYS", "NEUTRAL_KEYS", "RESULT_FORMAT", "RUN_ONLY_KEYS",
    "STUDY_DIR", "STUDY_KEYS", "AnalysisSet", "Run", "Study", "analyse_model", "check_output_folder", "config_fields",
    "copy_reusable",
    "describe_runs", "execute_run", "fingerprint", "finished_results", "head_importance", "head_metrics",
    "load_study", "matching_only", "plan_runs", "point_label", "report_from", "run_name", "run_status",
    "run_study", "seed_everything", "shipped_studies", "study_from_dict", "summarise", "without_timing",
    "write_report",
]


def __getattr__(name: str):
    """`write_report` is imported when first asked for: it brings in matplotlib, which planning,
    dry runs and the CLI's parser do not need."""
    if name == "write_report":
        from multimodal.compare.report import write_report

        return write_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
