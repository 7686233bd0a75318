"""Map overhead of the fusion block: forward with maps / forward without maps, one run.

    python benchmarks/fusion_overhead.py                 # the issue's setting, CPU
    python benchmarks/fusion_overhead.py --device cuda   # on a GPU
    python benchmarks/fusion_overhead.py --before /tmp/fusion_before.py   # an older fusion.py side by side

All variants run interleaved on the same inputs, so the ratios are measured in one run; each
reports its median and min, and the ratio of medians and of mins to the same code's forward
without maps. With `--before PATH` the `CrossAttentionFusion` of that file (same weights) runs
in the same loop.

Keeping maps means materialising fresh memory: (B, H, Nq, Nk) float32 per layer, 16 MB here.
With glibc's default allocator every such block is a new mmap and the kernel zero-fills its
pages on first touch (about 4.5 ms per 16 MB on the 2-core CPU), which is most of the
overhead. `--allocator both` (the default) therefore reports two runs: the default
allocator, and glibc told to keep freed blocks for reuse (MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_), which is how a long-running server (demos/run.sh) is started.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import fusion_class, run_under_both_allocators

from multimodal import CrossAttentionFusion, FusionConfig, ImageGeometry, ModalityTokens





def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--queries", type=int, default=64, help="learned latent queries")
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--attention", default="softmax")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--before", help="path of an older fusion.py to run side by side")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--allocator", choices=["both", "current"], default="both",
                    help="both: run once with glibc defaults and once with block reuse; current: this process only")
    args = ap.parse_args()
    if args.allocator == "both" and not args.device.startswith("cuda"):
        run_under_both_allocators(__file__)
        return

    torch.manual_seed(0)
    cfg = FusionConfig(dim=args.dim, heads=args.heads, layers=args.layers, num_latents=args.queries,
                       attention=args.attention)
    models = {"after": CrossAttentionFusion(cfg).to(args.device).eval()}
    if args.before:
        models["before"] = fusion_class(args.before)(cfg).to(args.device).eval()
        models["before"].load_state_dict(models["after"].state_dict())
    B, N = args.batch, args.keys
    geom = ImageGeometry(grid=(1, N), image_size=(16, 16 * N), patch_size=(16, 16))
    tokens = ModalityTokens(torch.randn(B, N, args.dim, device=args.device),
                            torch.ones(B, N, dtype=torch.bool, device=args.device), "image",
                            torch.zeros(B, N, dtype=torch.bool, device=args.device), geom)

    def timed(fusion, maps: bool) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fusion([tokens], return_maps=maps)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        assert (out.maps is not None) == maps
        return time.perf_counter() - t0

    runs = {(code, maps): [] for code in models for maps in (False, True)}
    with torch.inference_mode():
        for _ in range(5):  # warm-up
            for (code, maps) in runs:
                timed(models[code], maps)
        for _ in range(args.reps):
            for (code, maps), times in runs.items():
                times.append(timed(models[code], maps))
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"batch={B} queries={args.queries} keys={N} dim={args.dim} heads={args.heads} "
          f"layers={args.layers} attention={args.attention} reps={args.reps}")
    for code in models:
        plain, with_maps = runs[code, False], runs[code, True]
        p, m = statistics.median(plain), statistics.median(with_maps)
        print(f"[{code}] forward without maps: median {p * 1e3:.2f} ms, min {min(plain) * 1e3:.2f} ms")
        print(f"[{code}] forward with maps:    median {m * 1e3:.2f} ms, min {min(with_maps) * 1e3:.2f} ms")
        print(f"[{code}] map overhead ratio:   {m / p:.3f} (medians), {min(with_maps) / min(plain):.3f} (mins)  "
              f"(target <= 1.15)")


if __name__ == "__main__":
    main()
