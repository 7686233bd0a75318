"""End-to-end latency of the Gradio app: a real server, requests through gradio_client.

    python benchmarks/app_latency.py                   # embedded model if present, else random weights
    python benchmarks/app_latency.py --model DIR       # any checkpoint
    python benchmarks/app_latency.py --download        # the client also fetches every output file

The server runs in its own process exactly as `demos/run.sh` starts it (`python -m
multimodal demo`, glibc told to reuse freed blocks), so the client's work does not share
its interpreter. Each request sends the sample image, a 4 s clip and one caption to `/run`,
which renders every head of every layer (image, audio and text grids) plus the raw maps;
by default the client downloads no output files (a browser fetches only the grid shown).
After a warm-up, N sequential requests are timed; p50/p95 are printed with the
server-side time the page reports. Target on the 2-core CPU: p50 <= 0.5 s, p95 <= 1 s.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from common import REUSE_ENV

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "a red circle and a rising chirp"
AUDIO_SECONDS = 4.0
SR = 16_000


def sample_inputs(folder: Path) -> tuple[Path, Path]:
    """The bundled sample image if there is one (else a synthetic scene) and a 4 s clip."""
    images = sorted(p for p in (ROOT / "assets").glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if images:
        image = images[0]
    else:
        img = np.full((224, 224, 3), 110, np.uint8)
        yy, xx = np.mgrid[:224, :224]
        img[(yy - 80) ** 2 + (xx - 70) ** 2 < 30 ** 2] = (220, 40, 40)
        image = folder / "scene.png"
        Image.fromarray(img).save(image)
    t = np.arange(int(AUDIO_SECONDS * SR)) / SR
    freq = 400 + 600 * np.clip(t - 1.0, 0, 1.0)  # a rising chirp from 1 s to 2 s
    wave = 0.3 * np.sin(2 * np.pi * np.cumsum(freq) / SR) * ((t > 1.0) & (t < 2.0))
    wave += 0.01 * np.random.default_rng(0).standard_normal(t.shape)
    audio = folder / "clip.wav"
    sf.write(audio, wave.astype(np.float32), SR)
    return image, audio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"the server did not open port {port} within {timeout:.0f} s")


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--model", help="checkpoint directory (default: assets/default, else random weights)")
    ap.add_argument("--download", action="store_true", help="the client also downloads every output file")
    args = ap.parse_args()

    from gradio_client import Client, handle_file

    port = free_port()
    cmd = [sys.executable, "-m", "multimodal", "demo", "--port", str(port)]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, **REUSE_ENV, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with tempfile.TemporaryDirectory() as tmp:
        image, audio = sample_inputs(Path(tmp))
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(port, proc)
            client = Client(f"http://127.0.0.1:{port}", verbose=False,
                            download_files=str(Path(tmp) / "dl") if args.download else False)

            def request() -> tuple[float, float]:
                t0 = time.perf_counter()
                out = client.predict(handle_file(str(image)), handle_file(str(audio)), CAPTION, None, [], 0,
                                     "all tokens (mean)", api_name="/run")
                took = time.perf_counter() - t0
                server = re.search(r"in ([0-9.]+) s\.", out[0])
                return took, float(server[1]) if server else float("nan")

            for _ in range(args.warmup):
                request()
            times = [request() for _ in range(args.requests)]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            lines = proc.stdout.read().splitlines() if proc.stdout else []
            banner = next((l for l in lines if l.startswith("serving")), lines[0] if lines else "").strip()
    client_s = [t for t, _ in times]
    server_s = [s for _, s in times]
    print(f"server: {banner[:300]}")
    print(f"{args.requests} requests (image {image.name}, {AUDIO_SECONDS:.0f} s audio, one caption; every head of "
          f"every layer rendered; client downloads: {'all files' if args.download else 'none'})")
    print(f"  end to end : p50 {percentile(client_s, 50):.3f} s   p95 {percentile(client_s, 95):.3f} s   "
          f"mean {statistics.mean(client_s):.3f} s")
    print(f"  in handler : p50 {percentile(server_s, 50):.3f} s   p95 {percentile(server_s, 95):.3f} s")
    ok = percentile(client_s, 50) <= 0.5 and percentile(client_s, 95) <= 1.0
    print(f"  target p50 <= 0.5 s, p95 <= 1 s: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
