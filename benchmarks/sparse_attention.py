"""sparsemax and 1.5-entmax, forward + backward: the sandbox's against the `entmax` package.

    python benchmarks/sparse_attention.py                      # the fusion benchmark's shape, CPU
    python benchmarks/sparse_attention.py --keys 16000 --queries 16
    python benchmarks/sparse_attention.py --device cuda

Logits of shape (batch, heads, queries, keys), every key valid, as the fusion block's explicit
path computes them (scaled dot products). For each kind: this package's function with a full
sort and with a partial sort of the `--k` largest logits, and the `entmax` package's
(`entmax.sparsemax` / `entmax.entmax15`, full and with the same k) when it is installed
(`pip install entmax`). Values and gradients are checked equal to the `entmax` package's (to 1e-6,
in float64, where rounding does not hide a wrong support) and their float32 differences printed;
then every variant
runs forward + backward interleaved, `--reps` times, and the script prints median and min and the
ratio of medians to the `entmax` package's full-sort function.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from multimodal.fusion import entmax15_attention, sparsemax_attention

try:
    import entmax
except ImportError:  # the peer is optional
    entmax = None


def variants(kind: str, k: int) -> dict:
    ours = {"sparsemax": sparsemax_attention, "entmax15": entmax15_attention}[kind]
    out = {"sandbox": lambda z, m: ours(z, m), f"sandbox k={k}": lambda z, m: ours(z, m, k)}
    if entmax is not None:
        peer = {"sparsemax": entmax.sparsemax, "entmax15": entmax.entmax15}[kind]
        out["entmax"] = lambda z, m: peer(z, dim=-1)
        out[f"entmax k={k}"] = lambda z, m: peer(z, dim=-1, k=k)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--head-dim", type=int, default=32, help="sets the logits' scale, as in the fusion block")
    ap.add_argument("--k", type=int, default=64, help="logits sorted per row by the partial sort")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.queries, args.keys)
    q = torch.randn(args.batch, args.heads, args.queries, args.head_dim, generator=g)
    keys = torch.randn(args.batch, args.heads, args.keys, args.head_dim, generator=g)
    logits = (q @ keys.transpose(-2, -1) / args.head_dim ** 0.5).to(args.device)
    upstream = torch.randn(shape, generator=g).to(args.device)
    mask = torch.ones(args.batch, 1, 1, args.keys, dtype=torch.bool, device=args.device)
    print(f"logits {tuple(shape)} on {args.device}, {torch.get_num_threads()} threads; "
          f"entmax package: {'installed' if entmax else 'not installed (pip install entmax)'}")

    def run(fn, dtype=torch.float32) -> tuple[float, torch.Tensor, torch.Tensor]:
        z = logits.detach().to(dtype).clone().requires_grad_(True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        p = fn(z, mask)
        p.backward(upstream.to(dtype))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, p.detach(), z.grad

    for kind in ("sparsemax", "entmax15"):
        fns = variants(kind, args.k)
        support = (run(fns["sandbox"])[1] > 0).sum(-1).float()
        print(f"\n{kind}: support per row median {support.median():.0f}, max {support.max():.0f} of {args.keys} keys")
        for dtype, tol in ((torch.float64, 1e-6), (torch.float32, None)):  # the algorithms, then float32 rounding
            _, p0, g0 = run(fns[next(iter(fns)) if entmax is None else "entmax"], dtype)
            worst = (0.0, 0.0)
            for name, fn in fns.items():
                _, p, grad = run(fn, dtype)
                dp, dg = (p - p0).abs().max().item(), (grad - g0).abs().max().item()
                assert tol is None or (dp <= tol and dg <= tol), f"{name} differs: {dp:.2e} / {dg:.2e} in {dtype}"
                worst = max(worst[0], dp), max(worst[1], dg)
            print(f"  in {dtype}: values differ by at most {worst[0]:.1e}, gradients by {worst[1]:.1e}"
                  + (f" (checked <= {tol:g})" if tol else " (rounding)"))
        times = {name: [] for name in fns}
        for r in range(args.reps + 2):
            order = list(fns) if r % 2 else list(reversed(fns))
            for name in order:
                t = run(fns[name])[0]
                if r >= 2:
                    times[name].append(t)
        ref = "entmax" if entmax else "sandbox"
        ref_med = statistics.median(times[ref])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:>14}: median {med * 1e3:8.2f} ms   min {min(ts) * 1e3:8.2f} ms   "
                  f"{med / ref_med:.2f}x {ref} (medians), {min(ts) / min(times[ref]):.2f}x (mins)")


if __name__ == "__main__":
    main()
