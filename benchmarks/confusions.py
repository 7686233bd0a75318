"""Which one-attribute changes does a trained model still accept? Every change of a kind, on every test scene.

`multimodal eval` scores one negative of each kind per scene: enough to rank the kinds, too few to
say which changes within a kind are got wrong. This makes every change of the kinds asked for on
each scene (a small star called each of the other five shapes, where the caption stays false) and
tallies, per change: how often the model scores it no match on its own (p <= 0.5, as the app
reads it) and how often the scene's true caption outscores it. Object changes are split by the
size of the object changed. Worst changes first. Untimed.

    python benchmarks/confusions.py assets/default --kinds shape colour --scenes 300
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from tqdm import tqdm

from multimodal.data.pool import ScenePool, split_seeds
from multimodal.data.scenes import CHANGE_TYPES, REPEAT, SceneConfig, every_negative
from multimodal.inference import load_model
from multimodal.model import score_candidates

OBJECT_KINDS = ("colour", "shape", "size")


def tally(model, kinds: list[str], scenes: int, seed: int, batch: int = 16) -> dict:
    """{(kind, change key, object size or ""): [rejected on its own, true caption outscores it, pairs]}."""
    cfg = SceneConfig(**model.meta.get("train_config", {}).get("scene", {}))
    pool = ScenePool.build(split_seeds("test", scenes, seed), cfg)
    counts = defaultdict(lambda: [0, 0, 0])
    for start in tqdm(range(0, scenes, batch), desc="scoring every change"):
        idx = list(range(start, min(start + batch, scenes)))
        group = [pool.scenes[i] for i in idx]
        negatives = []
        for s in group:
            sizes = {p["index"]: s.objects[p["index"]]["size"] for p in s.phrases if p["target"] == "object"}
            objects = [p["index"] for p in s.phrases if p["target"] == "object"]
            negatives.append([(caption, change, sizes[objects[change["phrase"]]] if kind in OBJECT_KINDS else "")
                              for kind in kinds for caption, _, change in every_negative(s, kind)])
        width = max(len(n) for n in negatives)
        if not width:
            continue
        captions = []
        for s, negs in zip(group, negatives):  # each row padded with the true caption (not tallied)
            captions += [s.caption] + [c for c, _, _ in negs] + [s.caption] * (width - len(negs))
        with torch.no_grad():
            scores, _ = score_candidates(model, pool.batch(model, idx), captions, 1 + width)
        for negs, row in zip(negatives, scores.tolist()):
            for j, (_, change, size) in enumerate(negs):
                c = counts[(change["type"], change["key"], size)]
                c[0] += int(row[1 + j] <= 0)
                c[1] += int(row[0] > row[1 + j])
                c[2] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="checkpoint folders or embedded models' names, as --model takes")
    parser.add_argument("--kinds", nargs="+", default=["shape"], choices=[*CHANGE_TYPES, REPEAT],
                        help="kinds of change to make every one of (default: shape)")
    parser.add_argument("--scenes", type=int, default=300, help="test scenes (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="which test scenes, as eval --seed (default 0)")
    parser.add_argument("--worst", type=int, default=12, help="changes listed, worst first (default 12)")
    args = parser.parse_args()
    for name in args.models:
        model, _ = load_model(name)
        counts = tally(model, args.kinds, args.scenes, args.seed)
        print(f"{name}: {args.scenes} test scenes (seed {args.seed}); rejected on its own (p <= 0.5) / true "
              "caption outscores it / pairs")
        by = defaultdict(lambda: [0, 0, 0])
        for (kind, _, size), c in counts.items():
            for key in ((kind, size), (kind, "all")) if size else ((kind, "all"),):
                by[key] = [a + b for a, b in zip(by[key], c)]
        for (kind, size), (r, w, n) in sorted(by.items()):
            print(f"  {kind:<10} {size or 'all':<6} {r / n:.3f} / {w / n:.3f} / {n}")
        print(f"  the {args.worst} changes rejected least often:")
        rows = sorted(counts.items(), key=lambda kv: (kv[1][0] / kv[1][2], -kv[1][2]))
        for (kind, key, size), (r, w, n) in rows[:args.worst]:
            print(f"    {key:<34} {size:<6} {r / n:.3f} / {w / n:.3f} / {n}")


if __name__ == "__main__":
    main()
