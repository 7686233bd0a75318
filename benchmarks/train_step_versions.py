"""A training step of this checkout against the same step of another checkout (an older commit).

    git worktree add /tmp/before <commit>
    python benchmarks/train_step_versions.py /tmp/before            # 5 rounds of 12 steps each
    python benchmarks/train_step_versions.py /tmp/before --rounds 7

Two versions of the package cannot share one interpreter, so each round starts one process per
checkout, alternating which goes first; each process builds the default preset's model, scores
the same batches (32 scenes x 5 candidate captions) and times `--steps` whole optimiser steps
after 2 warm-up steps: candidate captions, encoders, fusion, matching + contrastive losses,
backward, AdamW. The step is written once, below, from functions both versions have
(`candidate_captions`, `score_candidates`, `matching_loss`, `contrastive_loss`), so each version
runs its own code for them. Prints each version's median and min over all rounds, and the ratio
this / other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

CHILD = r'''
import inspect, json, sys, time
import numpy as np, torch
from multimodal.data.pool import ScenePool, split_seeds
from multimodal.model import score_candidates
from multimodal.train.config import load_config, scene_config
from multimodal.train.loop import build_model, parameter_groups
from multimodal.train.objective import NegativeMining, candidate_captions, contrastive_loss, matching_loss

steps = int(sys.argv[1])
tc = load_config("default")
model = build_model(tc).train()
seeds, cfg = split_seeds("train", 32 * (steps + 3), 0), scene_config(tc)
if "model" in inspect.signature(ScenePool.build).parameters:  # before scenes were generated when drawn
    pool = ScenePool.build(model, seeds, cfg, 1, "scenes")
else:
    pool = ScenePool.build(seeds, cfg, progress=False)
opt = torch.optim.AdamW(parameter_groups(model, tc), lr=tc.lr)
rng, mining = np.random.default_rng(0), NegativeMining(tc.negative_mining)
params = [p for p in model.parameters() if p.requires_grad]
per_scene = 1 + tc.hard_negatives + tc.easy_negatives
times = []
for r in range(steps + 2):
    idx = list(range(32 * r, 32 * (r + 1)))
    batch = pool.batch(model, idx)  # the scenes' features: outside the timing in both versions
    t = time.perf_counter()
    captions, kinds = candidate_captions(pool, idx, tc, rng, mining.weights())
    scores, out = score_candidates(model, batch, captions, per_scene)
    mining.update(scores.detach(), kinds)
    loss = matching_loss(scores) + tc.contrastive_weight * contrastive_loss(
        model, out.tokens, per_scene, tc.contrastive_temperature, tc.contrastive_hard_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if r >= 2:
        times.append(time.perf_counter() - t)
print(json.dumps(times))
'''


def run_child(tree: Path, steps: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(steps)], cwd=tree, env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("other", type=Path, help="a checkout of the version to compare with (git worktree add ...)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per process")
    args = ap.parse_args()
    trees = {"this": HERE, "other": args.other.resolve()}
    times = {name: [] for name in trees}
    for r in range(args.rounds):
        for name in (list(trees) if r % 2 else list(reversed(trees))):
            times[name] += run_child(trees[name], args.steps)
    med = {n: statistics.median(t) for n, t in times.items()}
    low = {n: min(t) for n, t in times.items()}
    for n in trees:
        print(f"{n:>5} ({trees[n]}): median {med[n] * 1e3:6.1f} ms   min {low[n] * 1e3:6.1f} ms   "
              f"({len(times[n])} steps)")
    print(f"this / other: median {med['this'] / med['other']:.2f}x   min {low['this'] / low['other']:.2f}x")


if __name__ == "__main__":
    main()
