"""One command-line entry with subcommands: `multimodal maps ...`, `multimodal demo ...` (also `python -m multimodal`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "default"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def load_model(args) -> "MultimodalModel":
    """`--model DIR`, else the embedded default, else encoder specs with random weights."""
    from multimodal.model import MultimodalModel

    specs = {m: getattr(args, f"{m}_encoder") for m in ("text", "image", "audio")}
    if args.model:
        return MultimodalModel.from_pretrained(args.model, map_location=args.device)
    if not any(specs.values()) and (DEFAULT_MODEL / "config.json").is_file():
        return MultimodalModel.from_pretrained(DEFAULT_MODEL, map_location=args.device)
    print("note: no trained checkpoint named and none embedded; using encoder specs with RANDOM "
          "weights, so the maps show structure, not meaning", file=sys.stderr)
    from multimodal.fusion import FusionConfig

    fusion = FusionConfig(dim=args.dim, heads=args.fusion_heads, layers=args.fusion_layers, query=args.query)
    return MultimodalModel.from_specs(fusion=fusion, **{m: s for m, s in specs.items() if s}).to(args.device).eval()


def cmd_maps(args) -> int:
    import torch

    from multimodal.drawing import write_all
    from multimodal.fusion import MapRequest
    from multimodal.io import check_text, load_audio, load_image

    torch.manual_seed(args.seed)
    text = args.text
    if args.text_file:
        text = Path(args.text_file).read_text(encoding="utf-8")
    image = load_image(args.image) if args.image else None
    audio = load_audio(args.audio, truncate=True) if args.audio else None
    if audio is not None and audio.notice:
        print(f"note: {audio.notice}", file=sys.stderr)
    if text is not None:
        text = check_text(text)
    if image is None and audio is None and text is None:
        raise SystemExit("give at least one input: --image, --audio, --text or --text-file")

    model = load_model(args)
    request = MapRequest(layers=args.layers, heads=args.heads)
    with torch.inference_mode():
        out = model(text=None if text is None else [text], image=None if image is None else [image],
                    audio=None if audio is None else [audio], return_maps=request)
    written = write_all(out.maps, args.out, image=image, audio=audio, query=args.query_index)
    summary = {
        "model": str(args.model or (DEFAULT_MODEL if (DEFAULT_MODEL / "config.json").is_file() else "random-init")),
        "inputs": {"image": args.image, "audio": args.audio, "text": text},
        "match_score": float(torch.sigmoid(out.score[0])),
        "query_source": out.maps.query_source,
        "layers": out.maps.layers,
        "heads": out.maps.heads[out.maps.layers[0]],
        "files": [str(p) for p in written],
    }
    Path(args.out, "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"match score {summary['match_score']:.3f}; wrote {len(written) + 1} files to {args.out}:")
    for p in written:
        print(f"  {p}")
    return 0


def _demo_module():
    """demos/app.py (next to this package; it is not installed as a package of its own)."""
    try:
        import demos.app as app
        return app
    except ImportError:
        import importlib.util

        path = Path(__file__).resolve().parents[1] / "demos" / "app.py"
        if not path.is_file():
            raise SystemExit(f"the Gradio app is not here ({path}); run from a checkout of the sandbox")
        spec = importlib.util.spec_from_file_location("demos.app", path)
        app = importlib.util.module_from_spec(spec)
        sys.modules["demos.app"] = app
        spec.loader.exec_module(app)
        return app


def cmd_demo(args) -> int:
    app = _demo_module()
    specs = {m: getattr(args, f"{m}_encoder") for m in ("text", "image", "audio")}
    fusion = {"dim": args.dim, "heads": args.fusion_heads, "layers": args.fusion_layers, "query": args.query}
    model, source = app.load_app_model(args.model, specs, args.device, fusion)
    if source is None:
        print("note: no trained checkpoint named and none embedded; using encoder specs with RANDOM "
              "weights, so the maps show structure, not meaning", file=sys.stderr)
    app.serve(model, source, host=args.host, port=args.port, share=args.share)
    return 0


def cmd_scenes(args) -> int:
    from tqdm import tqdm

    from multimodal.data.manifest import scene_to_manifest_row, write_manifest
    from multimodal.data.scenes import generate_scene, save_scene
    from multimodal.train import split_seeds

    out = Path(args.out)
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


def add_model_args(p: argparse.ArgumentParser, query: str, heads: int) -> None:
    """--model, or encoder specs and fusion shape for a model built on the fly (random fusion weights)."""
    p.add_argument("--model", help="checkpoint directory (default: the embedded model in assets/default)")
    for mod in ("text", "image", "audio"):
        p.add_argument(f"--{mod}-encoder", help=f"{mod} encoder spec for a model built on the fly: built-in "
                                                "name, local directory or hub name (random fusion weights)")
    p.add_argument("--query", default=query, help=f"query source for a model built on the fly (default: {query})")
    p.add_argument("--dim", type=int, default=128, help="fusion width for a model built on the fly")
    p.add_argument("--fusion-heads", type=int, default=heads, help="heads for a model built on the fly")
    p.add_argument("--fusion-layers", type=int, default=2, help="layers for a model built on the fly")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="multimodal", description="Multimodal attention sandbox.")
    sub = ap.add_subparsers(dest="command", required=True)

    m = sub.add_parser("maps", help="write every head's attention map over the given inputs",
                       description="Run a model on any of --image/--audio/--text and write per-head overlay "
                                   "PNGs (one grid per layer and modality), text highlights (HTML) and the raw "
                                   "maps (maps.npz + maps.json).")
    m.add_argument("--image", help="image file (PNG, JPEG, ...)")
    m.add_argument("--audio", help="audio file (WAV, FLAC, OGG; any rate and channel count)")
    g = m.add_mutually_exclusive_group()
    g.add_argument("--text", help="caption text")
    g.add_argument("--text-file", help="file holding the caption text (UTF-8)")
    m.add_argument("--out", default="out/maps", help="output folder (default: out/maps)")
    add_model_args(m, query="latents", heads=8)
    m.add_argument("--layers", type=_int_list, default=None, help="layers to keep, e.g. 0,1 (default: all)")
    m.add_argument("--head", type=_int_list, default=None, dest="heads",
                   help="heads to keep, e.g. 0,3 (default: all)")
    m.add_argument("--query-index", type=int, default=None,
                   help="draw one query's map (e.g. a text token) instead of the mean over queries")
    m.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_maps)

    d = sub.add_parser("demo", help="serve the Gradio app (per-head overlays, metrics, ablation)",
                       description="Serve the attention sandbox in the browser: upload an image, an audio clip "
                                   "and/or a caption; see every head's map, per-head metrics, and switch heads "
                                   "off. Binds to 127.0.0.1 and makes no share link unless asked.")
    add_model_args(d, query="text", heads=4)
    d.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    d.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    d.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    d.set_defaults(func=cmd_demo)

    sc = sub.add_parser("scenes", help="write procedural scenes (image, audio, caption, ground truth) to files",
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

    from multimodal import compare, evaluate, train  # their parsers live beside their code

    train.add_parser(sub)
    evaluate.add_parser(sub)
    compare.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    from multimodal.types import InputError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
