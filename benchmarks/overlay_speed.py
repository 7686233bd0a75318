"""Overlay drawing speed: median milliseconds per grid of 8 heads for each modality.

    python benchmarks/overlay_speed.py
"""

import time

import numpy as np

from multimodal.overlays import audio_head_grid, image_head_grid, text_head_grid


def benchmark(repeats: int = 20, seed: int = 0) -> dict[str, float]:
    """Median milliseconds per grid: 8 image heads over 128x128 (192 px panels), 8 audio heads,
    8 text heads over 40 tokens. Prints and returns them."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    image_maps = rng.dirichlet(np.ones(64), size=8).reshape(8, 8, 8)  # (h, gh, gw)
    spec = rng.normal(-40, 10, (64, 301)).astype(np.float32)  # (n_mels, frames), 3 s
    frame_times = np.arange(301) * 0.01
    audio_maps = rng.dirichlet(np.ones(30), size=8)  # (h, T)
    map_times = (np.arange(30) + 0.5) * 0.1
    tokens = [f"tok{i}" if i % 5 else f"##p{i}" for i in range(40)]
    text_maps = rng.dirichlet(np.ones(40), size=8)  # (h, N)

    cases = {
        "image_8_heads": lambda: image_head_grid(image, image_maps),
        "audio_8_heads": lambda: audio_head_grid(spec, frame_times, audio_maps, map_times),
        "text_8_heads": lambda: text_head_grid(tokens, text_maps),
    }
    out = {}
    for name, fn in cases.items():
        fn()  # warm caches (fonts, LUTs)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        out[name] = float(np.median(times))
        print(f"{name:>14}: {out[name]:6.1f} ms (median of {repeats})")
    return out


if __name__ == "__main__":
    benchmark()
