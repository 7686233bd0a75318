"""How long the command line makes a user wait: `multimodal --help` and `multimodal maps --sample`.

    python benchmarks/cli_startup.py            # 7 rounds
    python benchmarks/cli_startup.py --reps 15

Each round runs, as fresh processes and in alternating order: `multimodal --help`;
`python -c "import torch"` (the floor any torch program pays); and `multimodal maps --sample`
(every head's maps of the default model on the bundled sample, PNGs included). Once, in this
process, it times the default model's forward on the sample (median of 5, after one warm-up):
the work `maps` cannot avoid. It prints median and min per command, and `maps` against
`import torch` + that forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def forward_seconds() -> float:
    import torch

    from multimodal.fusion import MapRequest
    from multimodal.inference import SAMPLE, load_inputs, load_model, run

    model, _ = load_model(None, {}, "cpu", {})
    inputs = load_inputs(str(SAMPLE["image"]), str(SAMPLE["audio"]), SAMPLE["text"].read_text())
    times = []
    with torch.no_grad():
        for _ in range(6):
            t = time.perf_counter()
            run(model, inputs, request=MapRequest())
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    out = tempfile.mkdtemp()
    commands = {
        "multimodal --help": [str(BIN / "multimodal"), "--help"],
        "import torch": [sys.executable, "-c", "import torch"],
        "multimodal maps --sample": [str(BIN / "multimodal"), "maps", "--sample", "--out", out],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    times = {name: [] for name in commands}
    for r in range(args.reps + 1):
        for name in (list(commands) if r % 2 else list(reversed(commands))):
            t = time.perf_counter()
            subprocess.run(commands[name], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if r:  # the first round warms the file cache
                times[name].append(time.perf_counter() - t)
    fwd = forward_seconds()
    for name, ts in times.items():
        print(f"{name:>26}: median {statistics.median(ts):6.2f} s   min {min(ts):6.2f} s   ({args.reps} runs)")
    print(f"{'default model forward':>26}: median {fwd:6.2f} s (in one process, maps of every head)")
    med = {n: statistics.median(t) for n, t in times.items()}
    low = {n: min(t) for n, t in times.items()}
    print(f"maps / (import torch + forward): median {med['multimodal maps --sample'] / (med['import torch'] + fwd):.2f}x"
          f"   min {low['multimodal maps --sample'] / (low['import torch'] + fwd):.2f}x")


if __name__ == "__main__":
    main()
