"""Linear probes: can an object's shape, colour and size be read off the image encoder's tokens?

Each object of a held-out procedural scene gets one feature vector: the encoder's patch
tokens averaged with weights = the share of each patch covered by the object's mask. A
multinomial logistic regression is fitted on the first 70% of the objects and scored on the
rest, against chance (the held-out share of the most frequent training label).

This separates two reasons a model can fail a one-attribute hard negative: the attribute is
not in the image tokens at all (the probe is near chance), or it is there but the fusion
block and match head do not use it for the caption (the probe is high, matching is not).

    python -m multimodal.analysis.probe --model assets/default          # a trained checkpoint
    python -m multimodal.analysis.probe --random vit-conv-scenes          # an untrained encoder
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from multimodal.data.scenes import COLOURS, SHAPES, SIZES, Scene, generate_scene

ATTRIBUTES = {"shape": list(SHAPES), "colour": list(COLOURS), "size": list(SIZES)}
PROBE_SEED_BASE = 30_000_000  # scene seeds of the probe set: disjoint from train/val/test ranges


@torch.no_grad()
def object_features(encoder, scenes: Sequence[Scene], batch_size: int = 50,
                    progress: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(X (objects, D), {attribute: label index per object}) from an `ImageEncoder`."""
    X, labels = [], {a: [] for a in ATTRIBUTES}
    for start in tqdm(range(0, len(scenes), batch_size), desc="encoding scenes", disable=not progress):
        chunk = scenes[start:start + batch_size]
        out = encoder.encode([s.image for s in chunk])
        g = out.geometry
        gh, gw = g.grid
        patches = out.tokens[:, g.num_prefix:].reshape(len(chunk), gh, gw, -1).float()  # (B, gh, gw, D)
        for b, scene in enumerate(chunk):
            masks = torch.from_numpy(scene.masks).float()[:, None]  # (K, 1, S, S)
            cover = F.adaptive_avg_pool2d(masks, (gh, gw))[:, 0]  # (K, gh, gw): share of each patch covered
            weights = cover / cover.sum((1, 2), keepdim=True).clamp_min(1e-12)
            X.append(torch.einsum("khw,hwd->kd", weights, patches[b]).cpu().numpy())
            for obj in scene.objects:
                for a, values in ATTRIBUTES.items():
                    labels[a].append(values.index(obj[a]))
    return np.concatenate(X), {a: np.asarray(v) for a, v in labels.items()}


def linear_probe(X: np.ndarray, y: np.ndarray, train_fraction: float = 0.7, steps: int = 300,
                 weight_decay: float = 1e-4, seed: int = 0) -> dict:
    """Fit softmax regression on the first `train_fraction` rows, score the rest.

    Features are standardised with the training rows' mean and std. Returns held-out
    accuracy, chance (most frequent training label's held-out share) and the row counts.
    """
    n = len(X)
    n_train = int(round(train_fraction * n))
    if n_train < 2 or n - n_train < 1:
        raise ValueError(f"{n} rows are too few for a probe (need >= 2 to fit and >= 1 to score)")
    x = torch.as_tensor(X, dtype=torch.float32)
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    t = torch.as_tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    classes = int(t.max()) + 1
    w = (0.01 * torch.randn(x.shape[1], classes, generator=gen)).requires_grad_()
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(x[:n_train] @ w + b, t[:n_train]).backward()
        opt.step()
    with torch.no_grad():
        accuracy = float(((x[n_train:] @ w + b).argmax(-1) == t[n_train:]).float().mean())
    majority = int(torch.bincount(t[:n_train], minlength=classes).argmax())
    return {"accuracy": accuracy, "chance": float((t[n_train:] == majority).float().mean()),
            "train": n_train, "test": n - n_train}


def probe_image_attributes(encoder, scenes: int = 600, seed: int = 0, progress: bool = False) -> dict:
    """Probe results per attribute for an image encoder on `scenes` fresh procedural scenes."""
    encoder.eval()
    sc = [generate_scene(PROBE_SEED_BASE + seed * 100_000 + i) for i in range(scenes)]
    X, labels = object_features(encoder, sc, progress=progress)
    return {a: linear_probe(X, y, seed=seed) for a, y in labels.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multimodal.analysis.probe",
                                description="Linear probes of an image encoder's tokens for each object's shape, "
                                            "colour and size on held-out procedural scenes.")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    who.add_argument("--random", metavar="SPEC", help="an untrained built-in image encoder, e.g. vit-tiny-scenes")
    p.add_argument("--scenes", type=int, default=600, help="probe scenes (default 600, about 1,500 objects)")
    p.add_argument("--seed", type=int, default=0, help="scene set and probe initialisation")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.random:
        from multimodal.encoders import build_encoder

        torch.manual_seed(args.seed)
        encoder, name = build_encoder("image", args.random), f"untrained {args.random}"
    else:
        from multimodal.cli import DEFAULT_MODEL
        from multimodal.model import MultimodalModel

        model = MultimodalModel.from_pretrained(args.model or DEFAULT_MODEL)
        if "image" not in model.encoders:
            p.error("this model has no image encoder")
        encoder, name = model.encoders["image"], args.model or "the embedded default"
    result = probe_image_attributes(encoder, args.scenes, args.seed, progress=not args.json)
    if args.json:
        print(json.dumps({"encoder": name, **result}, indent=1))
        return 0
    print(f"linear probes of {name} ({result['shape']['train']} objects to fit, {result['shape']['test']} to score)")
    print("| attribute | held-out accuracy | chance |\n|---|---|---|")
    for a, r in result.items():
        print(f"| {a} | {r['accuracy']:.3f} | {r['chance']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
