"""Training speed of a recipe variant: one training step of a preset against the same preset with
`--set` overrides, on the same scenes, timed interleaved (median and min of `--reps` steps each, after
`--warmup`), and the ratio variant / preset.

    python benchmarks/train_step_variant.py --set audio_encoder=ast-window-fine-scenes
    python benchmarks/train_step_variant.py --set fusion.heads=8 --set fusion.layers=4 --device cuda

Each variant has its own model, optimiser and scene pool (a different encoder may read other features);
both draw the same scenes in the same order.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from multimodal.data.pool import ScenePool, split_seeds
from multimodal.train.config import load_config, parse_override, scene_config
from multimodal.train.loop import build_model, parameter_groups, training_step
from multimodal.train.objective import NegativeMining


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="default", help="the recipe both start from (default: default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", required=True,
                    help="the variant's overrides, as train --set (repeatable)")
    ap.add_argument("--reps", type=int, default=6, help="timed steps per variant (default 6)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    changes = dict(parse_override(s) for s in args.set)
    configs = {"preset": load_config(args.preset, overrides={"device": args.device}),
               "variant": load_config(args.preset, overrides={**changes, "device": args.device})}
    n = args.warmup + args.reps
    runs = {}
    for name, tc in configs.items():
        torch.manual_seed(0)
        model = build_model(tc).to(args.device).train()
        pool = ScenePool.build(split_seeds("train", tc.batch_size * n, 0), scene_config(tc))
        runs[name] = {"tc": tc, "model": model, "pool": pool,
                      "opt": torch.optim.AdamW(parameter_groups(model, tc), lr=tc.lr),
                      "rng": np.random.default_rng(0), "mining": NegativeMining(tc.negative_mining),
                      "params": sum(p.numel() for p in model.parameters())}

    def step(run: dict, idx: list[int]) -> float:
        tc = run["tc"]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        training_step(run["model"], run["opt"], run["pool"], idx, tc, run["rng"], run["mining"], tc.lr)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    times = {name: [] for name in runs}
    for r in range(n):
        order = list(runs) if r % 2 else list(reversed(runs))
        for name in order:
            run = runs[name]
            B = run["tc"].batch_size
            idx = list(range(r * B, (r + 1) * B))
            run["pool"].batch(run["model"], idx)  # the pool's audio features: computed outside the timing
            t = step(run, idx)
            if r >= args.warmup:
                times[name].append(t)
    print(f"preset {args.preset!r} against it with {' '.join(args.set)}: {args.device}, "
          f"{torch.get_num_threads()} threads, batch {configs['preset'].batch_size} scenes")
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    for name, run in runs.items():
        print(f"{name:>8}: median {med[name]:7.2f} s   min {low[name]:7.2f} s   ({args.reps} steps; "
              f"{run['params']:,} parameters)")
    print(f"variant / preset: median {med['variant'] / med['preset']:.2f}x   min {low['variant'] / low['preset']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
