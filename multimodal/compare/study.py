"""The study file and its runs: `Study` (a TOML file, checked key by key), `plan_runs` (one `Run`
per grid point and seed, each `TrainConfig` checked before anything trains), the run's
`fingerprint` (what it computes, so a finished run is skipped and a changed one reruns) and its
status in a runs folder. The file format is described in `multimodal.compare`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
import tomllib
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from multimodal.data.scenes import ONE_OBJECT, SceneConfig
from multimodal.fusion import FusionConfig
from multimodal.train import PRESETS, TRAIN_STATE, TrainConfig, build_model, load_config
from multimodal.train.loop import own_encoder_layout
from multimodal.types import InputError

STUDY_DIR = Path(__file__).resolve().parents[1] / "studies"  # the shipped studies (multimodal/studies/)
RESULT_FORMAT = "multimodal-compare-run/2"  # bump when done.json changes meaning: old runs then rerun
# /2: the untrained baseline is each run's own initial weights; heads record a uniform head's shares
DONE = "done.json"
ERROR = "error.txt"
MODEL = "model"  # checkpoint folder inside a run folder
LOG = "log.txt"  # what a run printed, inside its folder
RUN_ONLY_KEYS = ("device", "workers")  # how a run executes, not what it computes: not in its fingerprint
# TrainConfig fields added after runs were published, at the value that reproduces those runs: left out of
# the fingerprint at that value, so adding a field does not make every finished run stale
NEUTRAL_KEYS = {"contrastive_hard_weight": 0.0, "negative_mining": 0.0, "curriculum_steps": 0,
                "masked_word_weight": 0.0, "freeze": [], "masked_word_rate": 0.3,
                "curriculum_scene": dict(ONE_OBJECT), "phrase_queries": False, "binding_negatives": 0.0,
                "encoder_lr_scales": {}, "match_over": "content", "stall_restarts": 0, "stall_step": 300,
                "stall_loss": 3.5, "encoder_depth": -1, "encoder_window": -1,
                "captions": "both", "calibrate": False, "contrastive_per_modality": False,
                "match_order": "off", "repeat_negatives": False, "mining_counts": "rank",
                "mining_values": False, "curriculum_every": []}
NEUTRAL_FUSION_KEYS = {"compete": False, "sinks": 0, "partial_sort": 0}  # the same inside the fusion table


# ---------------------------------------------------------------------------------------
# The study file
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    name: str
    question: str = ""
    seeds: tuple[int, ...] = (0,)
    eval_scenes: int = 200  # held-out scenes for matching accuracy and grounding (the same for every run)
    analysis_scenes: int = 64  # the first scenes of those, for per-head metrics, redundancy and importance
    shapley_permutations: int = 20  # Monte Carlo permutations for head Shapley values
    snapshots: tuple[int, ...] = ()  # training steps at which the model is evaluated too (0 = untrained)
    baselines: bool = True  # uniform-map / random-init / gradient-relevance grounding baselines
    eval_seed: int = 0  # which held-out scenes (split "test") every run is evaluated on
    redundancy_threshold: float = 0.3  # sqrt-JS distance under which heads are clustered as redundant
    grounded_pointing: float = 0.85  # a run grounds when its best head's strict pointing is >= this on both
    # modalities; conclusions about heads are drawn over the runs that ground only (the others are listed)
    base: Mapping[str, Any] = field(default_factory=dict)  # flattened TrainConfig overrides (+ "preset")
    grid: Mapping[str, tuple] = field(default_factory=dict)  # flattened key -> values, in file order
    # keys varied together ([zip]: the i-th values of every key form one point), crossed with the grid: for
    # points a full product would not allow, e.g. compete off / on / on with sinks
    zipped: Mapping[str, tuple] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["base"], d["grid"] = dict(self.base), {k: list(v) for k, v in self.grid.items()}
        d["zipped"] = {k: list(v) for k, v in self.zipped.items()}
        return d

    @property
    def factors(self) -> dict[str, list]:
        """Every varied key -> its distinct values in file order (grid keys, then [zip] keys)."""
        out = {k: list(v) for k, v in self.grid.items()}
        for k, values in self.zipped.items():
            out[k] = list({json.dumps(v, sort_keys=True): v for v in values}.values())
        return out

    def points(self) -> list[tuple[tuple[str, Any], ...]]:
        """Every point: the grid's product, each crossed with the [zip] rows, as (key, value) pairs."""
        keys, zkeys = list(self.grid), list(self.zipped)
        rows = list(zip(*(self.zipped[k] for k in zkeys))) if zkeys else [()]
        return [tuple(zip(keys, values)) + tuple(zip(zkeys, row))
                for values in itertools.product(*(self.grid[k] for k in keys)) for row in rows]


STUDY_KEYS = tuple("zip" if f.name == "zipped" else f.name for f in fields(Study))  # as the file spells them


def _type_ok(value: Any, ann: str) -> bool:
    """Does a TOML value fit a dataclass field annotation (as written in the source)?"""
    if ann == "bool":
        return isinstance(value, bool)
    if ann == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if ann == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann == "str":
        return isinstance(value, str)
    if ann.startswith("tuple[int"):
        return isinstance(value, (list, tuple)) and all(_type_ok(v, "int") for v in value)
    if ann.startswith("Mapping"):
        return isinstance(value, Mapping)
    return True


def _annotation(f) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def config_fields() -> dict[str, str]:
    """Every key a study may set -> its annotation: TrainConfig fields, fusion.*, scene.*."""
    out = {f.name: _annotation(f) for f in fields(TrainConfig) if f.name not in ("fusion", "scene")}
    out.update({f"fusion.{f.name}": _annotation(f) for f in fields(FusionConfig)})
    out.update({f"scene.{f.name}": _annotation(f) for f in fields(SceneConfig)})
    return out


def _flatten(table: Mapping) -> dict[str, Any]:
    """`{"fusion": {"dim": 64}}` (TOML's bare dotted keys) and `{"fusion.dim": 64}` alike -> dotted keys."""
    out = {}
    for key, value in table.items():
        if key in ("fusion", "scene") and isinstance(value, Mapping):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    return out


def _check_key_value(key: str, value: Any, where: str, known: dict[str, str]) -> None:
    if key not in known:
        close = [k for k in known if k.split(".")[-1] == key.split(".")[-1]]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"{where}: unknown key {key!r}{hint}; valid keys: TrainConfig fields "
                         f"{sorted(k for k in known if '.' not in k)}, fusion.* and scene.* fields")
    if not _type_ok(value, known[key]):
        raise InputError(f"{where}: {key} = {value!r} must be {known[key]}")


def study_from_dict(d: Mapping[str, Any], source: str = "study") -> Study:
    """Check a parsed study file and build the `Study`. Each error names the key."""
    unknown = sorted(set(d) - set(STUDY_KEYS))
    if unknown:
        raise InputError(f"{source}: unknown study key(s) {unknown}; valid keys: {list(STUDY_KEYS)}")
    if "name" not in d:
        raise InputError(f"{source}: the study needs a name (name = \"...\")")
    for f in fields(Study):
        key, ann = f.name, _annotation(f)
        if key not in ("base", "grid", "zipped") and key in d and not _type_ok(d[key], ann):
            raise InputError(f"{source}: {key} = {d[key]!r} must be {ann}")
    for key in ("eval_scenes", "analysis_scenes", "shapley_permutations"):
        if key in d and d[key] < 1:
            raise InputError(f"{source}: {key} = {d[key]} must be >= 1")
    if "redundancy_threshold" in d and d["redundancy_threshold"] <= 0:
        raise InputError(f"{source}: redundancy_threshold = {d['redundancy_threshold']} must be > 0")
    if "grounded_pointing" in d and not 0 <= d["grounded_pointing"] <= 1:
        raise InputError(f"{source}: grounded_pointing = {d['grounded_pointing']} is a pointing accuracy: use a "
                         "value in [0, 1]")
    seeds = tuple(d.get("seeds", (0,)))
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise InputError(f"{source}: seeds = {list(seeds)} must be a non-empty list of distinct integers >= 0")
    snapshots = tuple(d.get("snapshots", ()))
    if any(s < 0 for s in snapshots) or len(set(snapshots)) != len(snapshots):
        raise InputError(f"{source}: snapshots = {list(snapshots)} must be distinct training steps >= 0")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", d["name"]):
        raise InputError(f"{source}: name = {d['name']!r} may hold only letters, digits, '.', '_' and '-'")

    known = config_fields()
    for table in ("base", "grid", "zip"):
        if table in d and not isinstance(d[table], Mapping):
            raise InputError(f"{source}: {table} must be a table ([{table}])")
    base = _flatten(d.get("base", {}))
    preset = base.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise InputError(f"{source}: base.preset = {preset!r} is unknown; presets: {sorted(PRESETS)}")
    grid = _flatten(d.get("grid", {}))
    zipped = _flatten(d.get("zip", {}))
    lengths = {len(v) for v in zipped.values() if isinstance(v, list)}
    if zipped and (len(lengths) != 1 or not all(isinstance(v, list) for v in zipped.values())):
        raise InputError(f"{source} [zip]: every key needs a list of values, all of one length (the i-th values "
                         f"form one point); got {({k: v for k, v in zipped.items()})}")
    both = sorted(set(zipped) & set(grid))
    if both:
        raise InputError(f"{source}: {both} in both [grid] and [zip]: vary a key in one of them")
    for key, values in zipped.items():
        for v in values:
            _check_key_value(key, v, f"{source} [zip]", known)
    if zipped and len({json.dumps(row, sort_keys=True) for row in zip(*zipped.values())}) != next(iter(lengths)):
        raise InputError(f"{source} [zip]: two points are the same")
    for key, why in (("seed", "the study's seeds = [...] list"), ("snapshots", "the study's snapshots = [...]"),
                     ("preset", "[base]")):
        for where, table in (("base", base), ("grid", grid), ("zip", zipped)):
            if key in table and not (where == "base" and key == "preset"):
                raise InputError(f"{source}: {where}.{key} is not allowed here: use {why}")
    for key, value in base.items():
        _check_key_value(key, value, f"{source} [base]", known)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise InputError(f"{source} [grid]: {key} = {values!r} must be a non-empty list of values")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise InputError(f"{source} [grid]: {key} = {values!r} lists a value twice")
        for v in values:
            _check_key_value(key, v, f"{source} [grid]", known)
    if preset is not None:
        base = {"preset": preset, **base}
    return Study(name=d["name"], question=d.get("question", ""), seeds=seeds,
                 eval_scenes=d.get("eval_scenes", Study.eval_scenes),
                 analysis_scenes=d.get("analysis_scenes", Study.analysis_scenes),
                 shapley_permutations=d.get("shapley_permutations", Study.shapley_permutations),
                 snapshots=tuple(sorted(snapshots)), baselines=d.get("baselines", Study.baselines),
                 eval_seed=d.get("eval_seed", Study.eval_seed),
                 redundancy_threshold=float(d.get("redundancy_threshold", Study.redundancy_threshold)),
                 grounded_pointing=float(d.get("grounded_pointing", Study.grounded_pointing)),
                 base=base, grid={k: tuple(v) for k, v in grid.items()},
                 zipped={k: tuple(v) for k, v in zipped.items()})


def shipped_studies() -> list[str]:
    return sorted(p.stem for p in STUDY_DIR.glob("*.toml"))


def load_study(path_or_name: str | Path) -> Study:
    """A study TOML file, or the name of a shipped study (`size`, `attention_kind`, ...)."""
    path = Path(path_or_name)
    if not path.is_file() and (STUDY_DIR / f"{path_or_name}.toml").is_file():
        path = STUDY_DIR / f"{path_or_name}.toml"
    if not path.is_file():
        raise InputError(f"no study file {path_or_name!r}; give a TOML file or one of the shipped studies: "
                         f"{', '.join(shipped_studies())}")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"cannot read study {path}: {e}")
    return study_from_dict(d, source=str(path))


# ---------------------------------------------------------------------------------------
# Runs: one per grid point and seed, each with a readable, deterministic id
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    run_id: str  # e.g. "fusion.dim=64,fusion.heads=2,seed=0"
    point: tuple[tuple[str, Any], ...]  # (grid key, value) in grid order
    seed: int
    config: TrainConfig

    @property
    def group(self) -> str:
        """The grid point without the seed (the runs of one group differ only by seed)."""
        return point_label(self.point)


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format(v, "g")
    if isinstance(v, (str, int)):
        return str(v)
    return json.dumps(v, sort_keys=True, separators=(",", ":"))


def point_label(point: tuple[tuple[str, Any], ...]) -> str:
    return ",".join(f"{k}={_format_value(v)}" for k, v in point) or "base"


def run_name(point: tuple[tuple[str, Any], ...], seed: int) -> str:
    text = ",".join([f"{k}={_format_value(v)}" for k, v in point] + [f"seed={seed}"])
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def plan_runs(study: Study, check_models: bool = True) -> list[Run]:
    """Every run of the study, in grid order then seed order, each config checked.

    Raises `InputError` naming the run and the key before anything has run. With
    `check_models`, one model per distinct architecture is also built (random weights, no
    training), which catches encoder specs that cannot be loaded.
    """
    base = dict(study.base)
    preset = base.pop("preset", None)
    keys = list(study.factors)
    train_snapshots = tuple(s for s in study.snapshots if s > 0)  # step 0 is the untrained model: built, not saved
    runs, seen = [], set()
    for point in study.points():
        for seed in study.seeds:
            run_id = run_name(point, seed)
            if run_id in seen:
                raise InputError(f"two runs would share the folder {run_id!r}; make the grid values differ in "
                                 "letters or digits")
            seen.add(run_id)
            try:
                tc = load_config(preset, None, {**base, **dict(point), "seed": seed, "snapshots": train_snapshots})
            except InputError as e:
                raise InputError(f"run {run_id}: {e}") from None
            except (TypeError, ValueError) as e:
                raise InputError(f"run {run_id}: a value of {sorted(base) + keys} has the wrong type ({e})") from None
            if tc.manifest:
                raise InputError(f"run {run_id}: manifest = {tc.manifest!r}: compare evaluates grounding on the "
                                 "procedural scenes, so its runs train on them too; leave manifest out")
            late = [s for s in study.snapshots if s > tc.steps]
            if late:
                raise InputError(f"run {run_id}: snapshots {late} are after the last training step (steps = "
                                 f"{tc.steps})")
            runs.append(Run(run_id, point, seed, tc))
    if check_models:
        built = set()
        for run in runs:
            arch = json.dumps(_architecture(run.config), sort_keys=True)
            if arch not in built:
                built.add(arch)
                try:
                    build_model(run.config)
                except InputError as e:
                    raise InputError(f"run {run.run_id}: {e}") from None
    return runs


def _architecture(tc: TrainConfig) -> dict:
    return {"fusion": dict(tc.fusion), "match": tc.match,
            "encoders": [tc.text_encoder, tc.image_encoder, tc.audio_encoder, tc.encoder_depth, tc.encoder_window]}


def comparable_config(config: Mapping) -> dict:
    """A config dict without the keys that change how a run executes but not its numbers."""
    d = json.loads(json.dumps(dict(config)))
    if d.get("encoder_depth", -1) >= 0 or d.get("encoder_window", -1) >= 0:
        # the built-in encoders' own layers and window, written out, build the same model as -1 does
        own = own_encoder_layout(d.get("image_encoder"), d.get("audio_encoder"))
        for key, v in zip(("encoder_depth", "encoder_window"), own or ()):
            if d.get(key) == v:
                d[key] = -1
    for key in RUN_ONLY_KEYS:
        d.pop(key, None)
    for key, neutral in NEUTRAL_KEYS.items():
        if d.get(key) == neutral:
            d.pop(key)
    for key, neutral in NEUTRAL_FUSION_KEYS.items():
        if isinstance(d.get("fusion"), dict) and d["fusion"].get(key) == neutral:
            d["fusion"].pop(key)
    return d


def fingerprint(run: Run, study: Study) -> str:
    """What a run computes: its training config and the study's evaluation settings."""
    analysis = {k: getattr(study, k) for k in ("eval_scenes", "analysis_scenes", "shapley_permutations",
                                               "snapshots", "baselines", "eval_seed", "redundancy_threshold")}
    text = json.dumps({"format": RESULT_FORMAT, "config": comparable_config(run.config.to_dict()),
                       "analysis": analysis}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_status(run: Run, study: Study, runs_dir: Path) -> str:
    """'done', 'stale' (finished under another config or study setting), 'failed' or 'pending'."""
    folder = runs_dir / run.run_id
    done = folder / DONE
    if done.is_file():
        try:
            ok = json.loads(done.read_text()).get("fingerprint") == fingerprint(run, study)
        except (OSError, json.JSONDecodeError):
            ok = False
        return "done" if ok else "stale"
    return "failed" if (folder / ERROR).is_file() else "pending"


def finished_training(model_dir: Path, tc: TrainConfig) -> dict | None:
    """The train summary of a finished training of this very config, or None."""
    path = model_dir / "train_summary.json"
    if not path.is_file() or not (model_dir / "model.safetensors").is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same_config = comparable_config(summary.get("config", {})) == comparable_config(tc.to_dict())
    if not same_config or summary.get("steps") != tc.steps:
        return None
    return summary


def interrupted_training(model_dir: Path, tc: TrainConfig) -> int | None:
    """The step of an interrupted training of this very config in `model_dir` (a checkpoint with its training
    state, saved with the same comparable config), or None."""
    try:
        saved = json.loads((model_dir / "config.json").read_text())["meta"]["train_config"]
        step = int(json.loads((model_dir / f"{TRAIN_STATE}.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if comparable_config(saved) == comparable_config(tc.to_dict()) else None


@dataclass(frozen=True, eq=False)
class ReportedRun:
    """A finished run known from a report's results.json alone (a committed report, whose run folders,
    checkpoints and logs stayed on the machine that ran them): its results, enough to report it again."""
    report: Path  # the results.json
    record: dict  # its entry there: the run's done.json as it was
    study: str | None = None  # the name of the study that report is of


def source_study(source: Path | ReportedRun) -> str | None:
    """The name of the study a finished run elsewhere belongs to: the report's, or for a run folder its
    study folder's (study.json, or results.json where only a report was written). None when unknown."""
    if isinstance(source, ReportedRun):
        return source.study
    for name, key in (("study.json", lambda d: d["name"]), ("results.json", lambda d: d["study"]["name"])):
        try:
            return key(json.loads((source.parent.parent / name).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            continue
    return None


def copy_kind(source: Path | ReportedRun, study: Study) -> str:
    """'carry' when `study` itself computed the finished run `source` (an earlier output of it: a lost
    machine's committed report, a grid run in parts), else 'copy': another study computed it, directly or
    as a run it had itself copied."""
    try:
        record = source.record if isinstance(source, ReportedRun) else json.loads((source / DONE).read_text())
    except (OSError, json.JSONDecodeError):
        record = {}
    return "carry" if source_study(source) == study.name and "reused_from" not in record else "copy"


def reusable_source(run: Run, study: Study, runs_dir: Path,
                    index: Mapping[str, Path | ReportedRun]) -> Path | ReportedRun | None:
    """The finished run elsewhere that `run` would be copied from (`index`: fingerprint -> run folder or
    reported run, as `runner.reuse_index` builds it): None when the run is done here, or nothing else matches
    it. A run reported in this very folder's results.json counts: its run folder is what was lost."""
    source = index.get(fingerprint(run, study))
    if source is None or (isinstance(source, Path) and source.resolve() == (runs_dir / run.run_id).resolve()):
        return None
    return None if run_status(run, study, runs_dir) == "done" else source


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{max(0, round(seconds))} s ago"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _last_line(path: Path, tail: int = 4096) -> str:
    """The last non-empty line of a text file (read from its last `tail` bytes), or ''."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - tail))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return next((line.strip() for line in reversed(lines) if line.strip()), "")


def run_progress(run: Run, runs_dir: Path) -> tuple[str | None, list[str]]:
    """Where a run that is not done stands in its folder: (state, notes). state is 'resume' (a checkpoint of
    this config: a re-run goes on from its step), 'analyse' (a finished training: only the evaluation and
    analysis are left), 'restart' (its folder holds nothing of this config to go on from) or None (never
    started). The notes say so, give the error of a failed run, and the last line of its log with its age:
    minutes old while the run goes on, hours old when it has stopped."""
    folder = Path(runs_dir) / run.run_id
    if not folder.is_dir():
        return None, []
    model_dir = folder / MODEL
    if finished_training(model_dir, run.config) is not None:
        state, notes = "analyse", ["trained; its evaluation and analysis are still to run"]
    elif (step := interrupted_training(model_dir, run.config)) is not None:
        state, notes = "resume", [f"checkpoint at step {step} of {run.config.steps}: a re-run goes on from there"]
    else:
        state, notes = "restart", ["nothing to go on from (no checkpoint of this config yet): a re-run starts at step 0"]
    if error := _last_line(folder / ERROR):
        notes.append(f"failed: {error[:200]}")
    if line := _last_line(folder / LOG):
        age = time.time() - (folder / LOG).stat().st_mtime
        notes.append(f"log, {_ago(age)}: {line[:200]}")
    return state, notes


def describe_runs(study: Study, out: str | Path, reusable: Mapping[str, Path | ReportedRun] | None = None) -> str:
    """The dry-run listing: every run, its status and its fusion parameter count. `reusable`: fingerprint ->
    another study's finished run (`runner.reuse_index`); a run not done here that one of them matches is
    listed as 'copy' (run_study would copy it), or 'carry' when it is this study's own run from an earlier
    output. Under a pending or failed run started here: its checkpoint, error and last log line
    (`run_progress`), so a long study can be watched, or its stopped runs found, from the listing."""
    runs = plan_runs(study, check_models=False)
    runs_dir = Path(out) / "runs"
    params = {}
    points = max(1, len(runs) // len(study.seeds))
    lines = [f"study {study.name}: {len(runs)} runs ({points} grid point{'s' * (points > 1)} x "
             f"{len(study.seeds)} seed{'s' * (len(study.seeds) > 1)}) -> {out}"]
    if study.question:
        lines.append(f"question: {study.question}")
    counts = defaultdict(int)
    for r in runs:
        arch = json.dumps(_architecture(r.config), sort_keys=True)
        if arch not in params:
            params[arch] = sum(p.numel() for p in build_model(r.config).fusion.parameters())
        source = reusable_source(r, study, runs_dir, reusable) if reusable else None
        if source is None:
            status = run_status(r, study, runs_dir)
        else:
            status = copy_kind(source, study)
        counts[status] += 1
        lines.append(f"  [{status:7s}] {r.run_id}  (steps {r.config.steps}, fusion params {params[arch]:,})")
        if status in ("pending", "failed"):
            state, notes = run_progress(r, runs_dir)
            counts[state] += 1
            lines.extend(f"            {note}" for note in notes)
    started = [f"{counts[k]} {label}" for k, label in (("resume", "to go on from a checkpoint"),
                                                       ("analyse", "trained, to analyse")) if counts[k]]
    lines.append("to run: " + str(sum(counts[k] for k in ("pending", "failed", "stale")))
                 + (f" ({', '.join(started)})" if started else "")
                 + f"; done: {counts['done']}"
                 + (f"; copied from another study (--reuse): {counts['copy']}" if counts["copy"] else "")
                 + (f"; carried over from this study's earlier output (--reuse): {counts['carry']}"
                    if counts["carry"] else "")
                 + (f"; stale (config changed, will rerun): {counts['stale']}" if counts["stale"] else ""))
    return "\n".join(lines)
