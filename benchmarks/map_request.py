"""What a partial `MapRequest` costs the fusion block: time and peak memory above a run without maps.

    python benchmarks/map_request.py                                  # the issue's setting, CPU
    python benchmarks/map_request.py --before /tmp/fusion_before.py   # old fusion.py side by side
    python benchmarks/map_request.py --keys 4000 --reps 10 --mem-reps 2

Setting (defaults): batch 8, 64 latent queries, 16000 keys, dim 256, 8 heads, 2 layers; the
request keeps one head of one layer (`--layer`, `--head`). Variants: no maps, the one-head
request, all maps; with `--before PATH` the same three on the `CrossAttentionFusion` of that
file (same weights), so before and after are measured in one run.

Time: every variant in one process, interleaved rep by rep; median and min per variant and
the ratio to the same implementation's no-maps forward. Memory: peak RSS is per process, so
every (variant, rep) is a fresh process, interleaved: one small warm-up forward, then the
peak is reset (/proc/self/clear_refs) and one full forward measured as VmHWM - VmRSS before.
`--allocator both` (the default) runs it all with glibc's defaults and with freed blocks kept
for reuse (demos/run.sh), as benchmarks/fusion_overhead.py does. Read memory from the first:
with reuse, RSS also holds every block freed during the forward, so its peaks measure the
allocator's history more than what the forward keeps alive.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from common import fusion_class, run_under_both_allocators, status_kb

from multimodal import FusionConfig, ImageGeometry, MapRequest, ModalityTokens

TARGET_MEMORY = 2.0  # peak above no-maps <= 2x the maps a one-head request keeps
TARGET_TIME = 1.05  # and time <= 1.05x no-maps



def build_fusion(args, impl: str):
    torch.manual_seed(0)
    cfg = FusionConfig(dim=args.dim, heads=args.heads, layers=args.layers, num_latents=args.queries)
    return fusion_class(args.before if impl == "before" else None)(cfg).eval()


def image_tokens(args, keys: int) -> list[ModalityTokens]:
    g = torch.Generator().manual_seed(1)
    B, N = args.batch, keys
    geom = ImageGeometry(grid=(1, N), image_size=(16, 16 * N), patch_size=(16, 16))
    return [ModalityTokens(torch.randn(B, N, args.dim, generator=g), torch.ones(B, N, dtype=torch.bool), "image",
                           torch.zeros(B, N, dtype=torch.bool), geom)]


def request(args, variant: str):
    return {"none": False, "one-head": MapRequest(layers=(args.layer,), heads=(args.head,)), "all": True}[variant]




def one_memory_run(args, impl: str, variant: str) -> dict:
    fusion = build_fusion(args, impl)
    with torch.inference_mode():
        fusion(image_tokens(args, 16), return_maps=request(args, variant))  # warm-up: threads, lazy imports
        tokens = image_tokens(args, args.keys)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = status_kb("VmRSS")
        out = fusion(tokens, return_maps=request(args, variant))
        peak = status_kb("VmHWM")
    kept = 0 if out.maps is None else sum(w.numel() * w.element_size() for w in out.maps.weights.values())
    return {"peak_mb": (peak - before) / 1024, "maps_mb": kept / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--queries", type=int, default=64, help="learned latent queries")
    ap.add_argument("--keys", type=int, default=16000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--layer", type=int, default=1, help="the one layer the request keeps")
    ap.add_argument("--head", type=int, default=3, help="the one head the request keeps")
    ap.add_argument("--reps", type=int, default=15, help="timed forwards per variant")
    ap.add_argument("--mem-reps", type=int, default=3, help="fresh processes per variant for peak memory")
    ap.add_argument("--before", help="path of an older fusion.py to measure side by side")
    ap.add_argument("--allocator", choices=["both", "current"], default="both",
                    help="both: run once with glibc defaults and once with freed blocks reused; current: this process")
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.allocator == "both" and not args.child:
        run_under_both_allocators(__file__)
        return
    if args.child:
        print(json.dumps(one_memory_run(args, *args.child)))
        return

    impls = ["after"] + (["before"] if args.before else [])
    variants = ["none", "one-head", "all"]
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch} queries={args.queries} "
          f"keys={args.keys} dim={args.dim} heads={args.heads} layers={args.layers} "
          f"request=layer {args.layer} head {args.head}")

    # -- time: one process, interleaved ---------------------------------------------------
    tokens = image_tokens(args, args.keys)
    models = {impl: build_fusion(args, impl) for impl in impls}
    if args.before:
        models["before"].load_state_dict(models["after"].state_dict())
    times = {(i, v): [] for i in impls for v in variants}
    with torch.inference_mode():
        ref = models["after"](tokens).queries
        for impl in impls:  # warm-up, and every variant gives the same queries
            for v in variants:
                out = models[impl](tokens, return_maps=request(args, v))
                assert (out.queries - ref).abs().max().item() <= 1e-5, (impl, v)
        for _ in range(args.reps):
            for impl in impls:
                for v in variants:
                    t0 = time.perf_counter()
                    models[impl](tokens, return_maps=request(args, v))
                    times[impl, v].append(time.perf_counter() - t0)
    del models, tokens
    print("\ntime (one process, interleaved), ms and ratio to the same code's no-maps forward")
    print(f"{'code':>7} {'variant':>9} {'median':>9} {'min':>9} {'ratio med':>10} {'ratio min':>10}")
    for impl in impls:
        base = times[impl, "none"]
        for v in variants:
            t = times[impl, v]
            print(f"{impl:>7} {v:>9} {statistics.median(t) * 1e3:9.1f} {min(t) * 1e3:9.1f} "
                  f"{statistics.median(t) / statistics.median(base):10.3f} {min(t) / min(base):10.3f}")

    # -- memory: a fresh process per (variant, rep), interleaved --------------------------
    argv = list(sys.argv[1:])
    mem = {(i, v): [] for i in impls for v in variants}
    maps_mb = {}
    for _ in range(args.mem_reps):
        for impl in impls:
            for v in variants:
                r = subprocess.run([sys.executable, __file__, *argv, "--child", impl, v], check=True,
                                   capture_output=True, text=True, env=os.environ.copy())
                row = json.loads(r.stdout.strip().splitlines()[-1])
                mem[impl, v].append(row["peak_mb"])
                maps_mb[impl, v] = row["maps_mb"]
    print(f"\npeak memory during one forward (fresh process each, {args.mem_reps} reps), MB")
    print(f"{'code':>7} {'variant':>9} {'maps kept':>10} {'peak med':>9} {'peak min':>9} {'above none (med)':>17} "
          f"{'/ maps kept':>12}")
    for impl in impls:
        base = statistics.median(mem[impl, "none"])
        for v in variants:
            med, above = statistics.median(mem[impl, v]), statistics.median(mem[impl, v]) - base
            ratio = f"{above / maps_mb[impl, v]:12.2f}" if maps_mb[impl, v] else f"{'':>12}"
            print(f"{impl:>7} {v:>9} {maps_mb[impl, v]:10.1f} {med:9.1f} {min(mem[impl, v]):9.1f} {above:17.1f} {ratio}")
    above = statistics.median(mem["after", "one-head"]) - statistics.median(mem["after", "none"])
    t_med = statistics.median(times["after", "one-head"]) / statistics.median(times["after", "none"])
    t_min = min(times["after", "one-head"]) / min(times["after", "none"])
    print(f"\none-head request: peak above no-maps {above:.1f} MB = {above / maps_mb['after', 'one-head']:.2f}x the "
          f"maps kept (target <= {TARGET_MEMORY}x); time {t_med:.3f}x no-maps (min {t_min:.3f}; target <= "
          f"{TARGET_TIME}x)")


if __name__ == "__main__":
    main()
