"""What capturing encoder self-attention costs: one layer by hooks vs transformers' eager `output_attentions`.

    python benchmarks/encoder_capture.py                     # built-in text encoder at 512 tokens, layer 0
    python benchmarks/encoder_capture.py --layer 1 --batch 4
    python benchmarks/encoder_capture.py --config layers=12,hidden=768,heads=12,intermediate=3072 --batch 1

Variants on the same batch of 512-token texts (no padding):
  sdpa         the plain forward (no capture)
  eager        `capture_attention=True`: transformers' eager `output_attentions`, every layer (the peer:
               what BertViz-style tools do, and what this encoder did for any capture before)
  layer        `capture_attention=[layer]`: that layer's weights by a hook, every layer on SDPA

Time: one process, interleaved rep by rep; median and min, and ratios to sdpa (of medians, of mins).
Memory: peak RSS is per process, so every (variant, rep) is a fresh process, interleaved: a short
warm-up forward, then the peak is reset (/proc/self/clear_refs) and one forward measured as
VmHWM - VmRSS before it.

`--allocator both` (the default) runs everything twice, as benchmarks/fusion_overhead.py does: with
glibc's defaults (every weights tensor above 32 MiB is a fresh mmap whose pages the kernel zero-fills
on first touch, about 7 ms per 32 MiB here) and with freed blocks kept for reuse, how a long-running
server is started (demos/run.sh).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from common import run_under_both_allocators, status_kb

from multimodal.encoders.text import bert_tiny_scenes

TARGET_TIME = 1.25  # one layer captured: <= 1.25x the SDPA forward
TARGET_SAVING = 0.40  # and at least 40% less memory than eager output_attentions
VARIANTS = ("sdpa", "eager", "layer")

def build(args):
    torch.manual_seed(0)
    cfg = dict(kv.split("=") for kv in args.config.split(",")) if args.config else {}
    names = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
             "intermediate": "intermediate_size"}
    return bert_tiny_scenes(max_length=args.tokens, **{names[k]: int(v) for k, v in cfg.items()})


def texts(args, tokens: int) -> list[str]:
    """One-character words (one token each, within the 2,000-character text limit), truncated to `tokens`."""
    g = torch.Generator().manual_seed(0)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    return [" ".join(chars[int(i)] for i in torch.randint(len(chars), (tokens,), generator=g))
            for _ in range(args.batch)]


def capture(args, variant: str):
    return {"sdpa": False, "eager": True, "layer": [args.layer]}[variant]




def one_memory_run(args, variant: str) -> dict:
    enc = build(args)
    with torch.inference_mode():
        enc(enc.preprocess(texts(args, 16)), capture_attention=capture(args, variant))  # warm-up
        batch = enc.preprocess(texts(args, args.tokens))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = status_kb("VmRSS")
        out = enc(batch, capture_attention=capture(args, variant))
        peak = status_kb("VmHWM")
    kept = sum(a.numel() * a.element_size() for a in out.self_attention or [])
    return {"peak_mb": (peak - before) / 1024, "kept_mb": kept / 2**20, "tokens": out.tokens.shape[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layer", type=int, default=0, help="the layer captured by the 'layer' variant")
    ap.add_argument("--config", default="", help="BERT overrides, e.g. layers=12,hidden=768,heads=12,intermediate=3072 "
                                                  "(default: the built-in bert-tiny-scenes: 2 layers, 128 wide, 4 heads)")
    ap.add_argument("--reps", type=int, default=15, help="timed forwards per variant")
    ap.add_argument("--mem-reps", type=int, default=3, help="fresh processes per variant for peak memory")
    ap.add_argument("--allocator", choices=["both", "current"], default="both",
                    help="both: run once with glibc defaults and once with freed blocks reused; current: this process")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.allocator == "both" and not args.child:
        run_under_both_allocators(__file__)
        return
    if args.child:
        print(json.dumps(one_memory_run(args, args.child)))
        return

    enc = build(args)
    c = enc.model.config
    batch = enc.preprocess(texts(args, args.tokens))
    n = batch["input_ids"].shape[1]
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch} tokens={n} "
          f"layers={c.num_hidden_layers} hidden={c.hidden_size} heads={c.num_attention_heads} layer={args.layer}")
    times = {v: [] for v in VARIANTS}
    with torch.inference_mode():
        ref = {v: enc(batch, capture_attention=capture(args, v)) for v in VARIANTS}  # warm-up + agreement
        err = (ref["layer"].self_attention[0] - ref["eager"].self_attention[args.layer]).abs().max().item()
        assert err <= 1e-6, err
        for _ in range(args.reps):
            for v in VARIANTS:
                t0 = time.perf_counter()
                enc(batch, capture_attention=capture(args, v))
                times[v].append(time.perf_counter() - t0)
    del ref
    print(f"captured layer {args.layer} == eager output_attentions[{args.layer}] (max abs diff {err:.1e})")
    print("\ntime (one process, interleaved), ms and ratio to sdpa")
    print(f"{'variant':>8} {'median':>9} {'min':>9} {'ratio med':>10} {'ratio min':>10}")
    base = times["sdpa"]
    for v in VARIANTS:
        t = times[v]
        print(f"{v:>8} {statistics.median(t) * 1e3:9.1f} {min(t) * 1e3:9.1f} "
              f"{statistics.median(t) / statistics.median(base):10.3f} {min(t) / min(base):10.3f}")

    mem = {v: [] for v in VARIANTS}
    kept = {}
    for _ in range(args.mem_reps):
        for v in VARIANTS:
            r = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", v], check=True,
                               capture_output=True, text=True)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            mem[v].append(row["peak_mb"])
            kept[v] = row["kept_mb"]
    print(f"\npeak memory during one forward (fresh process each, {args.mem_reps} reps), MB")
    print(f"{'variant':>8} {'weights kept':>13} {'peak med':>9} {'peak min':>9} {'vs eager (med)':>15}")
    for v in VARIANTS:
        med = statistics.median(mem[v])
        print(f"{v:>8} {kept[v]:13.1f} {med:9.1f} {min(mem[v]):9.1f} {med / statistics.median(mem['eager']):15.2f}")
    t_ratio = statistics.median(times["layer"]) / statistics.median(times["sdpa"])
    t_min = min(times["layer"]) / min(times["sdpa"])
    saving = 1 - statistics.median(mem["layer"]) / statistics.median(mem["eager"])
    e_ratio = statistics.median(times["eager"]) / statistics.median(times["sdpa"])
    print(f"\none layer captured: {t_ratio:.3f}x sdpa time (min {t_min:.3f}; target <= {TARGET_TIME}x; eager "
          f"output_attentions {e_ratio:.3f}x); {saving:.0%} less memory than eager (target >= {TARGET_SAVING:.0%})")


if __name__ == "__main__":
    main()
