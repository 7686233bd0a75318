"""One command-line entry with subcommands: `multimodal maps ...`, `multimodal demo ...` (also `python -m multimodal`).

Heavy libraries (torch, transformers, timm, gradio) are imported inside the subcommand that needs
them, and only the chosen subcommand's parser is built in full, so `multimodal --help` and a
mistyped command answer without loading any of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from multimodal.errors import InputError

# each subcommand's one-line help, shown by `multimodal --help`
SUMMARY = {
    "maps": "write every head's attention map over the given inputs",
    "demo": "serve the Gradio app (per-head overlays, metrics, ablation)",
    "scenes": "write procedural scenes (image, audio, caption, ground truth) to files",
    "train": "train a model on procedural scenes (caption/scene matching)",
    "eval": "matching accuracy and per-head grounding on held-out scenes",
    "compare": "run a study: train/evaluate a grid of configurations and write a report",
}

def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _out_folder(path: str | Path) -> Path:
    """An output folder given on the command line: refused when it names an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {path} is an existing file; give a folder (it is created if missing)")
    return path


def _read_text_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"--text-file {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"--text-file {path} is a folder; give a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"--text-file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as "
                         "UTF-8") from None
    except OSError as e:
        raise InputError(f"--text-file {path} could not be read ({e.strerror})") from None


def _model_from_args(args):
    """`--model DIR`, else the embedded default, else encoder specs with random weights: (model, source)."""
    from multimodal.inference import RANDOM_WEIGHTS_NOTE, load_model

    specs = {m: getattr(args, f"{m}_encoder") for m in ("text", "image", "audio")}
    fusion = {"dim": args.dim, "heads": args.fusion_heads, "layers": args.fusion_layers, "query": args.query}
    model, source = load_model(args.model, specs, args.device, fusion)
    if source is None:
        print(f"note: {RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
    return model, source


def cmd_maps(args) -> int:
    import torch

    from multimodal.analysis.relevance import fusion_rollout
    from multimodal.drawing import RELEVANCE_LABEL, ROLLOUT_LABEL, write_all, write_encoder_maps
    from multimodal.fusion import MapRequest
    from multimodal.inference import (SAMPLE, describe_event_order, event_order, input_notices, load_inputs, run,
                                      run_with_relevance)

    torch.manual_seed(args.seed)
    if args.sample:
        args.image, args.audio, args.text_file = (str(SAMPLE[m]) for m in ("image", "audio", "text"))
    out_dir = _out_folder(args.out)
    text = args.text
    if args.text_file:
        text = _read_text_file(args.text_file)
    inputs = load_inputs(args.image, args.audio, text)
    if not inputs.given:
        raise SystemExit("give at least one input: --image, --audio, --text or --text-file (or --sample)")

    model, source = _model_from_args(args)
    notices = input_notices(model, inputs)
    for notice in notices:
        print(f"note: {notice}", file=sys.stderr)
    extras = None
    if args.relevance:  # the same forward pass, with grad, gives the maps and the relevance
        if args.layers is not None or args.heads is not None:
            raise InputError("--relevance needs every head of every layer (its rules average them all): "
                             "leave out --layers and --head")
        out, relevance = run_with_relevance(model, inputs, capture_attention=args.encoder_maps)
        extras = {RELEVANCE_LABEL: relevance, ROLLOUT_LABEL: fusion_rollout(out.maps)}
    else:
        out = run(model, inputs, request=MapRequest(layers=args.layers, heads=args.heads),
                  capture_attention=args.encoder_maps)
    written = write_all(out.maps, out_dir, image=inputs.image, audio=inputs.audio, query=args.query_index,
                        extras=extras)
    if args.encoder_maps:
        encoder_files = write_encoder_maps(out.tokens, out_dir, image=inputs.image, audio=inputs.audio,
                                           source=args.encoder_from)
        without = [m for m in out.tokens if not out.tokens[m].self_attention]
        if without:
            print(f"note: the {' and '.join(without)} encoder{'s have' if len(without) > 1 else ' has'} no "
                  "self-attention layers to draw", file=sys.stderr)
        written += encoder_files
    summary = {
        "model": str(source or "random-init"),
        "inputs": {"image": args.image, "audio": args.audio, "text": inputs.text},
        "match_score": float(torch.sigmoid(out.score[0])),
        "query_source": out.maps.query_source,
        "layers": out.maps.layers,
        "heads": out.maps.heads[out.maps.layers[0]],
        "notices": notices,
        "event_order": event_order(model, out),  # match_order models, captions with "then", every head's maps
        "files": [str(p) for p in written],
    }
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1))
    order = describe_event_order(summary["event_order"])
    if order:
        print(order)
    print(f"match score {summary['match_score']:.3f}; wrote {len(written) + 1} files to {args.out}:")
    for p in written:
        print(f"  {p}")
    return 0


def cmd_demo(args) -> int:
    from multimodal.app import serve

    model, source = _model_from_args(args)
    serve(model, source, host=args.host, port=args.port, share=args.share, models_dir=args.models)
    return 0


def cmd_scenes(args) -> int:
    from tqdm import tqdm

    from multimodal.data.manifest import scene_to_manifest_row, write_manifest
    from multimodal.data.scenes import generate_scene, save_scene
    from multimodal.data.pool import split_seeds

    out = _out_folder(args.out)
    seeds = args.seeds or split_seeds(args.split, args.count, args.base_seed)
    rows = []
    for k, seed in enumerate(tqdm(seeds, desc="writing scenes", disable=len(seeds) < 10)):
        name = args.name if len(seeds) == 1 else f"{args.name}{k:05d}"
        scene = generate_scene(seed)
        if args.manifest:
            rows.append(scene_to_manifest_row(scene, out, name))
        else:
            save_scene(scene, out, name)
    if args.manifest:
        print(f"wrote {len(rows)} scenes and {write_manifest(rows, out / 'manifest.jsonl')}")
    else:
        print(f"wrote {len(seeds)} scene(s) to {out} (image .png, audio .wav, ground truth .json + _masks.png)")
    return 0


# ---------------------------------------------------------------------------------------
# train, eval, compare: the engines' faces
# ---------------------------------------------------------------------------------------


def add_train_parser(sub) -> None:
    from multimodal.train import PRESETS

    p = sub.add_parser("train", help=SUMMARY["train"],
                       description="Train encoders + fusion block on caption/scene matching with one-attribute "
                                   "hard negatives. Config: --preset, then --config FILE.toml, then --set key=value "
                                   "(fusion.* and scene.* reach those tables). Writes a checkpoint directory "
                                   "(config.json, model.safetensors, tokenizer/, train_state.*) into a new or empty "
                                   "--out; a folder holding a checkpoint needs --resume or --overwrite, and one "
                                   "holding other files is refused (nothing in it is ever deleted). Ctrl-C finishes "
                                   "the current step, saves a checkpoint and prints the command that resumes it; "
                                   "the resumed run ends bit for bit where an uninterrupted one does (on CPU). "
                                   "Progress: bars on a terminal; into a log file (nohup, a pipe) a plain line every "
                                   "twentieth of the run with the time a step and the time left.")
    p.add_argument("--preset", default=None, help=f"start from a preset: {', '.join(sorted(PRESETS))}")
    p.add_argument("--config", help="TOML file with TrainConfig fields ([fusion] and [scene] tables)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set steps=500 --set fusion.heads=8")
    p.add_argument("--out", default="runs/train", help="checkpoint directory (default: runs/train)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="go on from the checkpoint in --out exactly where it stopped (an error if there is none)")
    again.add_argument("--overwrite", action="store_true",
                       help="train again from step 0 over the checkpoint in --out (its files are replaced as the "
                            "new run writes its own; other files stay)")
    p.add_argument("--eval-scenes", type=int, default=0,
                   help="after training, run the full evaluation on this many held-out scenes")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import shlex

    from multimodal.model import MultimodalModel
    from multimodal.train import load_config, parse_override, train
    from multimodal.train.loop import TRAIN_STATE, TrainingInterrupted

    tc = load_config(args.preset, args.config, dict(parse_override(s) for s in args.set))
    print(json.dumps(tc.to_dict()))
    try:
        summary = train(tc, args.out, resume=args.resume, overwrite=args.overwrite, progress=sys.stderr.isatty())
    except KeyboardInterrupt as e:  # Ctrl-C: once, the step was finished and saved; twice, or before step 1, not
        if isinstance(e, TrainingInterrupted):
            said = f"interrupted after step {e.step} of {e.steps}; the checkpoint of step {e.step} is in {args.out}."
        else:
            said = "stopped at once, without saving (a step under way is dropped)."
        try:
            step = json.loads((Path(args.out) / f"{TRAIN_STATE}.json").read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            print(f"\n{said} There is no checkpoint in {args.out} to resume.", file=sys.stderr)
            return 130
        again = ["multimodal", "train", *(["--preset", args.preset] if args.preset else []),
                 *(["--config", args.config] if args.config else []), *[a for s in args.set for a in ("--set", s)],
                 "--out", str(args.out), *(["--eval-scenes", str(args.eval_scenes)] if args.eval_scenes else []),
                 "--resume"]
        if not isinstance(e, TrainingInterrupted):
            said += f" The checkpoint in {args.out} is at step {step}."
        print(f"\n{said} Resume with:\n  {shlex.join(again)}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports Ctrl-C
    print(f"trained {summary['steps']} steps in {summary['wall_time_s']:.0f} s on {summary['device']}; "
          f"checkpoint in {args.out}")
    if args.eval_scenes:
        from multimodal.evaluate import evaluate, write_report

        result = evaluate(MultimodalModel.from_pretrained(args.out), scenes=args.eval_scenes, seed=tc.seed)
        j, m = write_report(result, args.out)
        print(Path(m).read_text())
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help=SUMMARY["eval"],
                       description="Evaluate a checkpoint on held-out procedural scenes: matching accuracy "
                                   "against one-attribute hard negatives, and for every layer and head the "
                                   "pointing game and energy inside the region for image objects and audio "
                                   "events, with uniform / random-init / gradient-relevance baselines. "
                                   "Writes eval.json and eval.md.")
    p.add_argument("--model", default=None, help="checkpoint directory, or an embedded model by name (default, local); "
                                                 "default: the embedded default")
    p.add_argument("--scenes", type=int, default=500, help="held-out scenes (default 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-baselines", action="store_true", help="skip the baselines (faster)")
    p.add_argument("--out", default=None, help="report folder (default: the checkpoint directory)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from multimodal.evaluate import evaluate, write_report
    from multimodal.inference import DEFAULT_CHECKPOINT, checkpoint_dir
    from multimodal.model import MultimodalModel

    model_dir = checkpoint_dir(args.model) if args.model else DEFAULT_CHECKPOINT
    out_dir = _out_folder(args.out) if args.out else model_dir
    model = MultimodalModel.from_pretrained(model_dir)
    result = evaluate(model, scenes=args.scenes, seed=args.seed, batch_size=args.batch_size,
                      baselines=not args.no_baselines)
    j, m = write_report(result, out_dir)
    print(m.read_text())
    print(f"wrote {j} and {m}")
    return 0


STUDY_EXAMPLE = """study file (TOML):
  name = "size"
  question = "Do larger fusion blocks have better-grounded, more specialised heads?"
  seeds = [0, 1, 2]
  eval_scenes = 200            # held-out scenes: matching accuracy, per-head grounding
  analysis_scenes = 64         # per-head metrics, redundancy, importance
  shapley_permutations = 20
  snapshots = [0, 100, 300]    # optional: also evaluate after these training steps
  baselines = true             # uniform / random-init / gradient-relevance grounding baselines
  [base]                       # TrainConfig overrides for every run
  preset = "default"
  steps = 300
  [grid]                       # cartesian product x seeds = the runs
  "fusion.dim" = [64, 128]
  "fusion.heads" = [2, 4]

examples:
  multimodal compare size --dry-run
  multimodal compare my_study.toml --out reports/mine --workers 2
  multimodal compare size --engine ray --address auto --cpus-per-run 4 --gpus-per-run 1
"""


def add_compare_parser(sub) -> None:
    from multimodal.compare import shipped_studies

    description = (
        "Run a comparison study described by a TOML file: a [grid] of TrainConfig values (fusion.* and "
        "scene.* included) times a list of seeds. Each run trains, evaluates on the same held-out scenes "
        "(matching accuracy, per-head grounding) and analyses its heads (entropy, confidence, spread, modality "
        "share, JS redundancy, ablation / gradient / Shapley importance). Writes OUT/report.md, OUT/plots/*.png, "
        "OUT/results.csv, OUT/results.json and one folder per run in OUT/runs/. Finished runs are skipped on a "
        f"re-run. Shipped studies (give the name instead of a file): {', '.join(shipped_studies())}.")
    p = sub.add_parser("compare", help=SUMMARY["compare"],
                       description=textwrap.fill(description, 88, break_on_hyphens=False), epilog=STUDY_EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", help="study TOML file, or the name of a shipped study (e.g. size)")
    p.add_argument("--out", default=None, help="report folder (default: reports/<study name>)")
    p.add_argument("--workers", type=int, default=1,
                   help="independent runs in parallel processes (default 1); each gets cores/N torch threads, "
                        "counting the cores this process may use (taskset -c 0-3: 4). The numbers do not depend on "
                        "N beyond float rounding (summation order)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local (default): this machine, --workers processes; ray: each run is a Ray task on the "
                        "cluster at --address, or on a local Ray instance (needs pip install \".[cluster]\")")
    p.add_argument("--address", default=None,
                   help="with --engine ray: the cluster to join, e.g. ray://HEAD:10001 or auto (default: start a "
                        "local Ray instance for this study)")
    p.add_argument("--cpus-per-run", type=float, default=1,
                   help="with --engine ray: CPUs each run asks for, and its torch threads (default 1)")
    p.add_argument("--gpus-per-run", type=float, default=0,
                   help="with --engine ray: GPUs each run asks for (default 0; a run uses CUDA when its node has it)")
    p.add_argument("--reuse", action="append", default=[], metavar="DIR",
                   help="another study's output folder, or a report folder holding results.json such as "
                        "multimodal/studies/reports/NAME (repeatable): a run here with the same config and "
                        "evaluation settings as one finished there (same fingerprint) is copied instead of computed "
                        "again (from a results.json: its results, without the checkpoint)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the study and list its runs (done / pending / failed / stale) without running anything; under a "
                        "run started in OUT: the step of its checkpoint, its error, and its log's last line and age "
                        "(minutes old: it is running; hours: it stopped, and a re-run goes on from the checkpoint)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the runs already finished (and the ones --reuse copies in); train nothing")
    p.add_argument("--train-only", action="store_true",
                   help="train the pending runs and stop: no evaluation, analysis or report (for a GPU machine "
                        "whose time is short). Copy OUT/runs/*/model to another machine's study folder and run "
                        "compare there: it analyses them without training again")
    p.add_argument("--seeds", type=_seed_list, default=None, metavar="S[,S...]",
                   help="run only the pending runs of these seeds (some of the study's) and leave the rest: to split "
                        "a study between processes or machines sharing OUT, e.g. taskset -c 0 ... --seeds 0,1 beside "
                        "taskset -c 1 ... --seeds 2. The report covers every run finished in OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)


def _seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give seeds as integers separated by commas, e.g. 0,2") from None


def cmd_compare(args) -> int:
    from multimodal.compare import (ERROR, check_output_folder, copy_reusable, describe_runs, finished_results,
                                    load_study, plan_runs, report_from, run_study)
    study = load_study(args.study)
    out = Path(args.out or Path("reports") / study.name)
    if args.dry_run:
        from multimodal.compare.runner import reuse_index
        print(describe_runs(study, out, reuse_index(args.reuse) if args.reuse else None))
        return 0
    if args.report_only:
        if args.seeds is not None:
            raise InputError("--seeds chooses which runs to run: --report-only runs none (it reports every run "
                             "finished in OUT); drop one of the two")
        runs = plan_runs(study, check_models=False)
        check_output_folder(study, out)
        copied = copy_reusable(study, runs, out / "runs", args.reuse)
        if copied:
            print(f"copied {len(copied)} run(s) from identical finished runs (--reuse): {', '.join(copied)}")
        results = finished_results(study, runs, out / "runs")
        if not results:
            raise InputError(f"no finished runs of study {study.name} in {out / 'runs'}: run it first")
        (out / "study.json").write_text(json.dumps(study.to_dict(), indent=1))  # as run_study writes it
        paths = report_from(study, results, runs, out)
        print(f"report from {len(results)} of {len(runs)} runs: {paths['report']}")
        return 0
    if args.engine != "ray" and (args.address or args.cpus_per_run != 1 or args.gpus_per_run):
        raise InputError("--address, --cpus-per-run and --gpus-per-run go with --engine ray")
    result = run_study(study, out, workers=args.workers, progress=not args.quiet, engine=args.engine,
                       address=args.address, cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                       reuse=args.reuse, train_only=args.train_only, seeds=args.seeds)
    verb = "trained" if args.train_only else "ran"
    print(f"{verb} {len(result['ran'])}, skipped {len(result['skipped'])} (already done), "
          f"copied {len(result['reused'])} (--reuse), "
          + (f"left {len(result['left'])} (other seeds than --seeds), " if args.seeds is not None else "")
          + f"failed {len(result['failed'])}")
    for run_id in result["failed"]:
        print(f"  failed: {run_id} (see {out / 'runs' / run_id / ERROR})", file=sys.stderr)
    if args.train_only:
        print(f"the same command without --train-only analyses them and writes the report, here or where "
              f"{out / 'runs'} is copied to")
    if result["report"]:
        print(f"report: {result['report']['report']}")
    return 1 if result["failed"] else 0


def add_model_args(p: argparse.ArgumentParser, query: str, heads: int) -> None:
    """--model, or encoder specs and fusion shape for a model built on the fly (random fusion weights)."""
    p.add_argument("--model", help="checkpoint directory, or an embedded model by name (default, local); default: "
                                   "the embedded default, bundled with the package")
    for mod in ("text", "image", "audio"):
        p.add_argument(f"--{mod}-encoder", help=f"{mod} encoder spec for a model built on the fly: built-in "
                                                "name, local directory or hub name (random fusion weights)")
    p.add_argument("--query", default=query, help=f"query source for a model built on the fly (default: {query})")
    p.add_argument("--dim", type=int, default=128, help="fusion width for a model built on the fly")
    p.add_argument("--fusion-heads", type=int, default=heads, help="heads for a model built on the fly")
    p.add_argument("--fusion-layers", type=int, default=2, help="layers for a model built on the fly")


def add_maps_parser(sub) -> None:
    m = sub.add_parser("maps", help=SUMMARY["maps"],
                       description="Run a model on any of --image/--audio/--text and write per-head overlay "
                                   "PNGs (one grid per layer and modality), text highlights (HTML) and the raw "
                                   "maps (maps.npz + maps.json).")
    m.add_argument("--image", help="image file (PNG, JPEG, ...)")
    m.add_argument("--audio", help="audio file (WAV, FLAC, OGG; any rate and channel count)")
    g = m.add_mutually_exclusive_group()
    g.add_argument("--text", help="caption text")
    g.add_argument("--text-file", help="file holding the caption text (UTF-8)")
    m.add_argument("--sample", action="store_true",
                   help="use the bundled sample scene (image, audio and caption) as the inputs")
    m.add_argument("--out", default="out/maps", help="output folder (default: out/maps)")
    add_model_args(m, query="latents", heads=8)
    m.add_argument("--layers", type=_int_list, default=None, help="layers to keep, e.g. 0,1 (default: all)")
    m.add_argument("--head", type=_int_list, default=None, dest="heads",
                   help="heads to keep, e.g. 0,3 (default: all)")
    m.add_argument("--query-index", type=int, default=None,
                   help="draw one query's map (e.g. a text token) instead of the mean over queries")
    m.add_argument("--relevance", action="store_true",
                   help="end each grid with the layer's gradient-weighted relevance (Chefer et al. 2021) and the "
                        "attention rollout through the fusion layers, on the heads' colour scale (one extra forward "
                        "and backward pass)")
    m.add_argument("--encoder-maps", action="store_true",
                   help="also draw each encoder's own self-attention per layer and head, and its attention "
                        "rollout (encoder_<modality>_layer<l>.png, encoder_<modality>_rollout.png)")
    m.add_argument("--encoder-from", choices=("cls", "mean"), default="cls",
                   help="encoder maps: the CLS token's attention (default), or the mean over the content tokens")
    m.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_maps)


def add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help=SUMMARY["demo"],
                       description="Serve the attention sandbox in the browser: upload an image, an audio clip "
                                   "and/or a caption; see every head's map, per-head metrics, and switch heads "
                                   "off. Binds to 127.0.0.1 and makes no share link unless asked.")
    add_model_args(d, query="text", heads=4)
    d.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    d.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    d.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    d.add_argument("--models", metavar="DIR",
                   help="a folder of checkpoint folders (train --out runs, copied checkpoints): the page lets each "
                        "visitor switch among them and the embedded default without a restart")
    d.set_defaults(func=cmd_demo)


def add_scenes_parser(sub) -> None:
    sc = sub.add_parser("scenes", help=SUMMARY["scenes"],
                        description="Write scenes of the procedural corpus the default model trains on: "
                                    "NAME.png, NAME.wav, NAME.json (caption, phrase spans, objects, events) and "
                                    "NAME_masks.png; with --manifest also a manifest.jsonl for `train --set "
                                    "manifest=...`. Deterministic by seed.")
    sc.add_argument("--out", default="out/scenes", help="output folder (default: out/scenes)")
    sc.add_argument("--count", type=int, default=1, help="how many scenes (default: 1)")
    sc.add_argument("--split", default="test", choices=("train", "val", "test"),
                    help="seed range to draw from (default: test, never trained on)")
    sc.add_argument("--base-seed", type=int, default=0, help="training seed whose split is used (default: 0)")
    sc.add_argument("--seeds", type=_int_list, default=None, help="explicit scene seeds, e.g. 20000000,20000001")
    sc.add_argument("--name", default="scene", help="file stem (numbered when writing several; default: scene)")
    sc.add_argument("--manifest", action="store_true", help="also write manifest.jsonl")
    sc.set_defaults(func=cmd_scenes)


def build_parser(full: set[str] | None = None) -> argparse.ArgumentParser:
    """The parser; `full` names the subcommands whose parsers are built in full (None: all). The
    others are one help line each: enough for `multimodal --help`, never parsed."""
    ap = argparse.ArgumentParser(prog="multimodal", description="Multimodal attention sandbox.")
    sub = ap.add_subparsers(dest="command", required=True)
    builders = {"maps": add_maps_parser, "demo": add_demo_parser, "scenes": add_scenes_parser,
                "train": add_train_parser, "eval": add_eval_parser, "compare": add_compare_parser}
    for name in SUMMARY:
        if full is None or name in full:
            builders[name](sub)
        else:
            sub.add_parser(name, help=SUMMARY[name], add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)  # the subcommand (options come after it)
    args = build_parser({chosen} & set(SUMMARY)).parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
