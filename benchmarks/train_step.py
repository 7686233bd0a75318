"""Training speed: one step with each scene projected once vs once per candidate; a short run's set-up.

    python benchmarks/train_step.py                  # the default preset, CPU
    python benchmarks/train_step.py --device cuda    # on a GPU
    python benchmarks/train_step.py --run-steps 0    # the step comparison only

Part 1, the step. A training step scores 1 + hard + easy candidate captions per scene (5 in the
default preset). `shared` is the loop's step (`training_step`): each scene's image/audio tokens
are embedded and projected once and its captions attend to them as one set. `repeated` is the
step as it was: the scene's tokens are copied once per candidate before the fusion block. Both
start from the same weights and draws; their first losses and updated weights are compared, then
the two are timed interleaved on the same batches (median and min of `--reps` steps each, after
`--warmup`), and the ratio shared / repeated is printed.

Part 2, set-up. `train` runs `--run-steps` steps of the default preset twice (one after the
other, same seed): with the pool generated up front in 2 processes (`workers=2`, as before) and
with each scene generated when first drawn (`workers=0`, the default); for each it prints the
set-up time (start to the first step), the wall time and the set-up's share.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import numpy as np
import torch

from multimodal.data.pool import ScenePool, split_seeds
from multimodal.train.config import load_config, scene_config
from multimodal.train.loop import build_model, parameter_groups, train, training_step
from multimodal.train.objective import NegativeMining


def step_comparison(args) -> None:
    tc = load_config("default", overrides={"device": args.device})
    pool = ScenePool.build(split_seeds("train", args.batch * (args.reps + args.warmup + 1), 0), scene_config(tc))
    base = build_model(tc).to(args.device).train()
    variants = {}
    for name in ("repeated", "shared"):
        model = copy.deepcopy(base)
        variants[name] = {"model": model, "opt": torch.optim.AdamW(parameter_groups(model, tc), lr=tc.lr),
                          "rng": np.random.default_rng(0), "mining": NegativeMining(tc.negative_mining)}

    def step(name: str, idx: list[int]) -> tuple[float, float]:
        v = variants[name]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _ = training_step(v["model"], v["opt"], pool, idx, tc, v["rng"], v["mining"], tc.lr * 0.1,
                                share_scene=name == "shared")
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, loss

    idx = list(range(args.batch))
    pool.batch(base, idx)  # the first batch's audio features, outside the timing
    losses = {}
    for name in variants:
        torch.manual_seed(1)  # the same dropout draws in both
        losses[name] = step(name, idx)[1]
    diff = max((a - b).abs().max().item() for a, b in zip(variants["shared"]["model"].parameters(),
                                                           variants["repeated"]["model"].parameters()))
    per_scene = 1 + tc.hard_negatives + tc.easy_negatives
    print(f"default preset, batch {args.batch} scenes x {per_scene} candidate captions, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"first step: loss repeated {losses['repeated']:.7f}, shared {losses['shared']:.7f} "
          f"(|difference| {abs(losses['repeated'] - losses['shared']):.2e}); largest weight difference after it "
          f"{diff:.2e}")
    times = {name: [] for name in variants}
    for r in range(args.warmup + args.reps):
        idx = list(range((r + 1) * args.batch, (r + 2) * args.batch))
        pool.batch(base, idx)  # audio features are cached per scene by the pool: compute them outside the timing
        order = list(variants) if r % 2 else list(reversed(variants))
        for name in order:
            t, _ = step(name, idx)
            if r >= args.warmup:
                times[name].append(t)
    med = {n: statistics.median(t) for n, t in times.items()}
    low = {n: min(t) for n, t in times.items()}
    for n in variants:
        print(f"{n:>9}: median {med[n] * 1e3:7.1f} ms   min {low[n] * 1e3:7.1f} ms   ({args.reps} steps)")
    print(f"shared / repeated: median {med['shared'] / med['repeated']:.2f}x   min {low['shared'] / low['repeated']:.2f}x")


def setup_share(args) -> None:
    print(f"\n{args.run_steps}-step runs of the default preset ({args.device}):")
    for workers, how in ((2, "pool generated up front, 2 processes"), (0, "scenes generated when first drawn")):
        tc = load_config("default", overrides={"steps": args.run_steps, "eval_every": args.run_steps,
                                               "checkpoint_every": args.run_steps, "workers": workers,
                                               "device": args.device})
        with tempfile.TemporaryDirectory() as d:
            s = train(tc, f"{d}/run", progress=False)
        print(f"  workers={workers} ({how}): set-up {s['setup_s']:.1f} s of {s['wall_time_s']:.1f} s wall "
              f"= {s['setup_s'] / s['wall_time_s']:.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32, help="scenes per step (the default preset's)")
    ap.add_argument("--reps", type=int, default=12, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--run-steps", type=int, default=60, help="steps of the set-up runs (0: skip part 2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    step_comparison(args)
    if args.run_steps:
        setup_share(args)


if __name__ == "__main__":
    main()
