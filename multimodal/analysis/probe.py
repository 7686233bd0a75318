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
    python -m multimodal.analysis.probe --learn vit-tiny-scenes --attribute shape   # can it learn shape?

`--learn` asks the question before the probe: trained with the attribute as its label (one
object per image, a linear head on the max over patch tokens), does a fresh encoder learn the
attribute at all, and how fast? An encoder that cannot learn shape from the label itself will
not learn it from caption matching either.
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

from multimodal.data.scenes import COLOURS, ONE_OBJECT, SHAPES, SIZES, Scene, SceneConfig, generate_scene

ATTRIBUTES = {"shape": list(SHAPES), "colour": list(COLOURS), "size": list(SIZES)}
PROBE_SEED_BASE = 50_000_000  # probe scene seeds: clear of the train/val/test/curriculum ranges (SPLIT_OFFSETS)
PROBE_SEED_STRIDE = 100_000  # scene seeds per probe seed
LEARN_SEED_OFFSET = 5_000_000  # `--learn` scenes come after the probe's


def probe_seed_base(seed: int, learn: bool = False) -> int:
    """First scene seed of probe seed `seed` (of `--learn` when `learn`); it owns PROBE_SEED_STRIDE seeds."""
    return PROBE_SEED_BASE + (LEARN_SEED_OFFSET if learn else 0) + seed * PROBE_SEED_STRIDE


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
    sc = [generate_scene(probe_seed_base(seed) + i) for i in range(scenes)]
    X, labels = object_features(encoder, sc, progress=progress)
    return {a: linear_probe(X, y, seed=seed) for a, y in labels.items()}


WORD_TEMPLATES = {"shape": ("a red {} with a low tone", 3), "colour": ("a {} circle with a low tone", 2),
                  "size": ("a {} red circle with a low tone", 2)}  # caption, index of the word's token


@torch.no_grad()
def word_separation(model) -> dict[str, float]:
    """Per attribute: mean cosine between the fusion-projected text tokens of its words in one caption
    template ("a red {circle, square, ...} with a low tone"), over all pairs of words.

    Near 1: the model's text side has merged the words (it cannot ask for one shape rather than
    another, so nothing pushes the image side to tell them apart); low: the words stay distinct.
    """
    model.eval()
    text = model.encoders["text"]
    out = {}
    for attribute, (template, position) in WORD_TEMPLATES.items():
        words = ATTRIBUTES[attribute]
        tokens = text.encode([template.format(w) for w in words]).tokens[:, position]  # (W, D)
        v = F.normalize(model.fusion.input_proj["text"](tokens), dim=-1)
        sim = v @ v.T
        n = len(words)
        out[attribute] = float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
    return out


def learnability(spec: str, attribute: str = "shape", steps: int = 600, batch_size: int = 64,
                 lr: float = 1e-3, train_scenes: int = 6000, test_scenes: int = 600, every: int = 100,
                 seed: int = 0, progress: bool = False) -> list[dict]:
    """Train a fresh built-in image encoder + linear head to classify one object's `attribute`.

    One-object procedural scenes; the head reads the maximum over patch tokens (so the object
    may be anywhere). Returns held-out accuracy every `every` steps (and at the end) with the
    chance level (the most frequent training label's held-out share).
    """
    from multimodal.encoders import build_encoder

    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute {attribute!r}: use one of {sorted(ATTRIBUTES)}")
    cfg = SceneConfig(**ONE_OBJECT)
    values = ATTRIBUTES[attribute]

    def scenes(base: int, n: int) -> tuple[list[np.ndarray], torch.Tensor]:
        sc = [generate_scene(base + i, cfg) for i in tqdm(range(n), desc="generating scenes", disable=not progress)]
        return [s.image for s in sc], torch.tensor([values.index(s.objects[0][attribute]) for s in sc])

    base = probe_seed_base(seed, learn=True)
    train_x, train_y = scenes(base, train_scenes)
    test_x, test_y = scenes(base + 50_000, test_scenes)
    torch.manual_seed(seed)
    encoder = build_encoder("image", spec)
    head = torch.nn.Linear(encoder.dim, len(values))
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr, weight_decay=0.05)

    def logits(images: list[np.ndarray]) -> torch.Tensor:
        t = encoder.encode(images)
        return head(t.tokens.masked_fill((~t.mask | t.special)[..., None], float("-inf")).amax(1))

    majority = int(torch.bincount(train_y, minlength=len(values)).argmax())
    chance = float((test_y == majority).float().mean())
    rng = np.random.default_rng(seed)
    curve = []
    for step in tqdm(range(1, steps + 1), desc=f"training {spec} on {attribute}", disable=not progress):
        encoder.train()
        idx = rng.choice(train_scenes, batch_size, replace=False)
        loss = F.cross_entropy(logits([train_x[i] for i in idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            encoder.eval()
            with torch.no_grad():
                hits = sum(int((logits(test_x[i:i + 100]).argmax(-1) == test_y[i:i + 100]).sum())
                           for i in range(0, test_scenes, 100))
            curve.append({"step": step, "loss": loss.item(), "accuracy": hits / test_scenes, "chance": chance})
    return curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multimodal.analysis.probe",
                                description="Linear probes of an image encoder's tokens for each object's shape, "
                                            "colour and size on held-out procedural scenes.")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    who.add_argument("--random", metavar="SPEC", help="an untrained built-in image encoder, e.g. vit-tiny-scenes")
    who.add_argument("--learn", metavar="SPEC", help="instead of probing: train a fresh built-in image encoder "
                                                     "with --attribute as its label and report held-out accuracy")
    p.add_argument("--attribute", default="shape", choices=sorted(ATTRIBUTES), help="for --learn (default shape)")
    p.add_argument("--steps", type=int, default=600, help="for --learn: training steps of 64 images (default 600)")
    p.add_argument("--scenes", type=int, default=600, help="probe scenes (default 600, about 1,500 objects)")
    p.add_argument("--seed", type=int, default=0, help="scene set and probe initialisation")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.learn:
        curve = learnability(args.learn, args.attribute, steps=args.steps, seed=args.seed, progress=not args.json)
        if args.json:
            print(json.dumps({"encoder": args.learn, "attribute": args.attribute, "curve": curve}, indent=1))
            return 0
        print(f"fresh {args.learn} trained on one-object scenes with {args.attribute} as its label "
              f"(chance {curve[0]['chance']:.3f})")
        print("| step | training loss | held-out accuracy |\n|---|---|---|")
        for r in curve:
            print(f"| {r['step']} | {r['loss']:.3f} | {r['accuracy']:.3f} |")
        return 0
    if args.random:
        from multimodal.encoders import build_encoder

        torch.manual_seed(args.seed)
        encoder, name = build_encoder("image", args.random), f"untrained {args.random}"
    else:
        from multimodal.inference import DEFAULT_CHECKPOINT as DEFAULT_MODEL
        from multimodal.model import MultimodalModel

        model = MultimodalModel.from_pretrained(args.model or DEFAULT_MODEL)
        if "image" not in model.encoders:
            p.error("this model has no image encoder")
        encoder, name = model.encoders["image"], args.model or "the embedded default"
    result = probe_image_attributes(encoder, args.scenes, args.seed, progress=not args.json)
    words = word_separation(model) if not args.random and "text" in model.encoders else None
    if args.json:
        print(json.dumps({"encoder": name, **result, **({"word_cosine": words} if words else {})}, indent=1))
        return 0
    print(f"linear probes of {name} ({result['shape']['train']} objects to fit, {result['shape']['test']} to score)")
    print("| attribute | held-out accuracy | chance |\n|---|---|---|")
    for a, r in result.items():
        print(f"| {a} | {r['accuracy']:.3f} | {r['chance']:.3f} |")
    if words:
        print("\ntext side: mean cosine between the projected tokens of an attribute's words "
              "(near 1 = merged, the model cannot ask for one rather than another)")
        print("| attribute | word cosine |\n|---|---|")
        for a, c in words.items():
            print(f"| {a} | {c:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
