"""Where does a trained model's audio attention for an event phrase go, per head and per kind of event?

The audio energy target reads the mass inside the event (columns whose centre lies in it, as
`multimodal eval`). This splits the rest: the columns within one column spacing of the event (the
edge: a patch there still reads part of the event), within two, on the scene's other events, and
the rest (background). It also says how often each head's peak is inside the event (strict
pointing, first maximum) and how often it sits on an edge column instead.

    python benchmarks/audio_spill.py assets/default --scenes 256
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch

from multimodal.analysis.grounding import audio_columns, phrase_map, phrase_tokens
from multimodal.data.pool import ScenePool, split_seeds
from multimodal.data.scenes import SceneConfig
from multimodal.inference import load_model
from multimodal.model import score_candidates

PARTS = ("inside", "edge 1", "edge 2", "others", "rest")  # others: the scene's other events
COLUMNS = (*PARTS, "gain", "strict", "edge peak")  # edge peak: the peak on an edge-1 column


def phrase_rows(m: torch.Tensor, times: torch.Tensor, valid: torch.Tensor, event: tuple[float, float],
                others: list[tuple[float, float]]) -> np.ndarray:
    """One event phrase's maps `m (h, T)` -> `(h, len(COLUMNS))`: mass in each part, gain, strict hit, edge peak."""
    m = (m * valid).clamp_min(0)
    m = m / m.sum(1, keepdim=True).clamp_min(1e-12)
    start, end = event
    spacing = float(times[1] - times[0])
    inside = (times >= start) & (times <= end) & valid
    outside = torch.where(times < start, start - times, times - end) / spacing  # columns from the event
    edge1 = ~inside & (outside <= 1) & valid
    edge2 = ~inside & (outside > 1) & (outside <= 2) & valid
    other = torch.zeros_like(inside)
    for s, e in others:
        other |= (times >= s) & (times <= e)
    other &= valid & ~(inside | edge1 | edge2)
    rest = valid & ~(inside | edge1 | edge2 | other)
    chance = float(inside.sum()) / max(int(valid.sum()), 1)
    peak = m.masked_fill(~valid, -1).argmax(1)  # (h,)
    parts = torch.stack([(m * p).sum(1) for p in (inside, edge1, edge2, other, rest)], 1)  # (h, 5)
    extra = torch.stack([parts[:, 0] / max(chance, 1e-9), inside[peak].float(), edge1[peak].float()], 1)
    return torch.cat([parts, extra], 1).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a checkpoint folder or a named one (default, local)")
    parser.add_argument("--scenes", type=int, default=256, help="held-out test scenes (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="test seed range, as eval --seed (default 0)")
    args = parser.parse_args(argv)
    model = load_model(args.model)[0]
    cfg = SceneConfig(**model.meta.get("train_config", {}).get("scene", {}))
    pool = ScenePool.build(split_seeds("test", args.scenes, args.seed), cfg)
    per_head, per_kind = defaultdict(list), defaultdict(list)
    for first in range(0, args.scenes, 32):
        idx = list(range(first, min(first + 32, args.scenes)))
        group = [pool.scenes[i] for i in idx]
        with torch.no_grad():
            _, out = score_candidates(model, pool.batch(model, idx), [s.caption for s in group], 1, return_maps=True)
        maps = out.maps
        times, valid = audio_columns(maps)
        for layer in maps.layers:
            audio = maps.audio_maps(layer, renormalise=True).cpu()  # (B, h, Nq, T)
            for b, scene in enumerate(group):
                events = [(ev["start"], ev["end"]) for ev in scene.events]
                for phrase in scene.phrases:
                    q = phrase_tokens(maps, b, phrase["span"])
                    if phrase["target"] != "event" or not q.any():
                        continue
                    k = phrase["index"]
                    rows = phrase_rows(phrase_map(audio[b], q), times, valid[b], events[k],
                                       [e for i, e in enumerate(events) if i != k])
                    for h, row in enumerate(rows):
                        per_head[(layer, h)].append(row)
                        per_kind[scene.events[k]["kind"]].append(row)
    width = max(len(c) for c in COLUMNS)
    header = " ".join(f"{c:>{width}s}" for c in COLUMNS)
    phrases = len(next(iter(per_head.values())))
    print(f"{args.model}: {phrases} event phrases on {args.scenes} test scenes (seed {args.seed}); shares of each "
          "head's audio map, renormalised over the audio keys")
    print(f"{'layer head':14s} {header}")
    for (layer, h), rows in sorted(per_head.items()):
        print(f"L{layer} H{h:<10d} " + " ".join(f"{v:>{width}.3f}" for v in np.mean(rows, 0)))
    print(f"{'all heads':14s} " + " ".join(f"{v:>{width}.3f}" for v in np.mean(sum(per_head.values(), []), 0)))
    print(f"\n{'event kind':14s} {header}   phrases (every head)")
    for kind, rows in sorted(per_kind.items()):
        print(f"{kind:14s} " + " ".join(f"{v:>{width}.3f}" for v in np.mean(rows, 0)) + f"   {len(rows) // len(per_head)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
