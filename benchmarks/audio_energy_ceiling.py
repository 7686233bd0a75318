"""How much energy per event phrase can a map on the default audio encoder's token grid put inside the event?

The default's audio target is a mean per-phrase energy of 4x the uniform map's (energy inside the event /
the event's share of the columns, `analysis.grounding.interval_mass`). This scores reference maps on the
same held-out scenes and the same column grid as `multimodal eval`, with no model:

- inside columns: all the mass spread over the columns whose centre lies in the event (the ceiling);
- region share: each column's share of its own spacing inside the event (eval's "region" row);
- patch overlap: each column weighted by the share of its patch (16 fbank frames, 0.16 s) inside the
  event: what a map that knows exactly how much event sound each token holds would draw;
- touching patches: spread evenly over every column whose patch holds any of the event.

Columns are spaced 0.1 s apart but each token reads 0.16 s of sound, so a column just outside an event
still holds most of it: the last two rows show what that overlap costs a map that follows the sound.

    python benchmarks/audio_energy_ceiling.py --scenes 500
    python benchmarks/audio_energy_ceiling.py --scenes 500 --patch 8 --stride 8   # a finer grid, for comparison
"""

from __future__ import annotations

import argparse
import statistics

import torch

from multimodal.analysis.grounding import interval_mass
from multimodal.data.pool import split_seeds
from multimodal.data.scenes import SceneConfig, generate_scene
from multimodal.encoders.audio import HOP_SECONDS, WINDOW_SECONDS, ast_window_scenes
from multimodal.io import AudioClip


def reference_maps(times: torch.Tensor, valid: torch.Tensor, interval: tuple[float, float], patch: int
                   ) -> dict[str, torch.Tensor]:
    """(T,) column centre times, (T,) valid columns, one event -> each reference map (T,)."""
    start, end = interval
    spacing = float(times[1] - times[0])
    half = (patch - 1) / 2 * HOP_SECONDS + WINDOW_SECONDS / 2  # a patch's frames reach this far from its centre
    inside = ((times >= start) & (times <= end)).float()
    region = (torch.clamp(times + spacing / 2, max=end) - torch.clamp(times - spacing / 2, min=start)).clamp_min(0)
    overlap = (torch.clamp(times + half, max=end) - torch.clamp(times - half, min=start)).clamp_min(0)
    maps = {"inside columns": inside, "region share": region, "patch overlap": overlap,
            "touching patches": (overlap > 0).float()}
    return {k: v * valid for k, v in maps.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=500, help="held-out test scenes (default 500, as eval)")
    parser.add_argument("--seed", type=int, default=0, help="test seed range, as eval --seed (default 0)")
    parser.add_argument("--patch", type=int, default=16,
                        help="patch size in fbank frames and mel bins (default 16, the default encoder's)")
    parser.add_argument("--stride", type=int, default=10,
                        help="frames between columns (default 10, the default encoder's); the mel stride is the patch")
    args = parser.parse_args(argv)
    # random init: only its column grid is read (another grid: the same AST built with that patch and stride)
    encoder = ast_window_scenes(patch_size=args.patch, frequency_stride=args.patch, time_stride=args.stride)
    scenes = [generate_scene(s, SceneConfig()) for s in split_seeds("test", args.scenes, args.seed)]
    gains: dict[str, list[float]] = {}
    for first in range(0, len(scenes), 50):
        group = scenes[first:first + 50]
        with torch.no_grad():
            tokens = encoder.encode([AudioClip(s.audio, s.sample_rate, None) for s in group])
        times = torch.tensor(tokens.geometry.times)
        valid = tokens.mask[:, ::encoder.freq_bins]  # (B, T): one flag per column
        for b, scene in enumerate(group):
            for phrase in scene.phrases:
                if phrase["target"] != "event":
                    continue
                ev = scene.events[phrase["index"]]
                for name, m in reference_maps(times, valid[b].float(), (ev["start"], ev["end"]),
                                              encoder.patch_size).items():
                    iv = torch.tensor([[ev["start"], ev["end"]]])
                    mass, chance = interval_mass(m[None], times, iv, valid[b][None])
                    gains.setdefault(name, []).append(float(mass / chance))
    n = len(next(iter(gains.values())))
    print(f"{n} event phrases on {len(scenes)} test scenes (seed {args.seed}); {len(times)} columns "
          f"{float(times[1] - times[0]):.2f} s apart, each patch {encoder.patch_size} frames")
    print(f"{'reference map':18s} mean energy / uniform (per phrase)   median")
    for name, g in gains.items():
        print(f"{name:18s} {statistics.mean(g):6.2f}x {statistics.median(g):34.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
