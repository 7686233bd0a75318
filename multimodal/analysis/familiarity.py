"""How far an image or a clip is from what a model was trained on, measured on its own encoder tokens.

A scene-trained model sees a real photo or a voice as it sees scenes: its maps come out as one
or two blobs and its score means little, with nothing on the page to say so. `Familiarity`
measures it the way deep nearest-neighbour out-of-distribution detection does (Sun et al.
2022, "Out-of-Distribution Detection with Deep Nearest Neighbors"): each content token,
L2-normalised, is matched to its nearest token in a bank of training-distribution tokens, and
an input's score is the 90th percentile of those distances over its tokens (most of an
unfamiliar input is far from everything the model saw, not one corner of it). The threshold is
the 99th percentile of the same score on held-out scenes, so about 1 in 100 held-out scenes is
flagged by construction. Scenes come from the validation seeds of the model's training seed and
scene config (never the test scenes): 128 fill the bank (4,096 of their tokens, drawn at random),
128 more set the threshold.

An image is also measured by the same rule on its own pixels: each pixel's RGB colour (at the
encoder's input size, in [0, 1], read on an even subsample of 2,048 pixels) against a bank of
2,048 pixel colours of the bank scenes, the 90th percentile of the distances, and a threshold
from the held-out scenes: the farthest of them (no held-out scene is flagged by its colours; the
99th percentile flagged 1-3 in 100 test scenes, and photos lie far beyond either). Encoder tokens alone
can miss a photo whose tokens happen to lie near the scenes' (the default's 8-px tokens of a
figure on a plain grey-brown ground scored 0.70x their threshold), while every photo's colours lie
far beyond the scenes' (gradio's nine sample images: 1.5-4.0x the threshold). Either reading flags it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from multimodal.data.pool import ScenePool, split_seeds
from multimodal.data.scenes import SceneConfig
from multimodal.types import ModalityTokens

QUANTILE = 0.9  # an input's score: this quantile of its tokens' nearest-neighbour distances
FLAG_RATE = 0.01  # the threshold: the score exceeded by this share of held-out scenes
BANK_TOKENS = 4096  # per modality, drawn at random from the bank scenes' tokens (a request costs ~1 ms)
BANK_PIXELS = 2048  # pixel colours, drawn at random from the bank scenes' images
SAMPLE_PIXELS = 2048  # an image's colours are read on an even subsample of at most this many pixels
PIXELS = "pixels"  # the bank and threshold of the image's own pixel colours
WHAT = {"image": "image", "audio": "clip"}


def pixel_colours(image, size: tuple[int, int]) -> Tensor:
    """(H*W, 3) RGB colours in [0, 1] of an image (PIL or an (H, W, 3) uint8 array) resized to `size`
    (H, W) as the image encoder resizes it."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    h, w = size
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).reshape(-1, 3) / 255.0)


def _content(t: ModalityTokens, item: int) -> Tensor:
    """(n, D) L2-normalised content tokens of one item (padding and special tokens left out)."""
    keep = (t.mask & ~t.special)[item]
    return F.normalize(t.tokens[item][keep].float(), dim=-1)


@dataclass
class Familiarity:
    bank: dict[str, Tensor]  # modality -> (M, D) normalised training-distribution tokens
    threshold: dict[str, float]  # modality (or PIXELS) -> score above which an input is called unfamiliar
    pixel_size: tuple[int, int] = (128, 128)  # (H, W) the image encoder's input size: images are measured at it

    @classmethod
    def for_model(cls, model) -> "Familiarity | None":
        """The measure for a model trained on the procedural scenes (its config says so); None for
        any other (a manifest's, a hub model, random weights): their training data is not here."""
        if not model.trained_on_scenes or not {"image", "audio"} & set(model.encoders):
            return None
        return cls.from_scenes(model)

    @classmethod
    @torch.no_grad()
    def from_scenes(cls, model, scenes: int = 256, seed: int | None = None, batch_size: int = 32) -> "Familiarity":
        """Half of `scenes` validation scenes fill the bank, the other half set the threshold."""
        tc = model.meta.get("train_config", {})
        seed = int(tc.get("seed", 0)) if seed is None else seed
        cfg = SceneConfig(**tc.get("scene", {}))
        pool = ScenePool.build(split_seeds("val", scenes, seed), cfg)
        mods = [m for m in ("image", "audio") if m in model.encoders]
        tokens: dict[str, list[Tensor]] = {m: [] for m in mods}
        for start in range(0, scenes, batch_size):
            idx = list(range(start, min(start + batch_size, scenes)))
            encoded = model.encode(pool.batch(model, idx))
            for m in mods:
                tokens[m] += [_content(encoded[m], i).cpu() for i in range(len(idx))]
        half = scenes // 2
        gen = torch.Generator().manual_seed(seed)
        bank = {}
        for m in mods:
            every = torch.cat(tokens[m][:half])  # (M, D)
            bank[m] = every[torch.randperm(len(every), generator=gen)[:BANK_TOKENS]]
        pixel_size = cls.pixel_size
        if "image" in mods:
            pixel_size = model.encoders["image"].input_size
            tokens[PIXELS] = [pixel_colours(pool.scenes[i].image, pixel_size) for i in range(scenes)]
            every = torch.cat(tokens[PIXELS][:half])
            bank[PIXELS] = every[torch.randperm(len(every), generator=gen)[:BANK_PIXELS]]
        fam = cls(bank, {}, pixel_size)
        for m in bank:
            held_out = [fam._score(m, t) for t in tokens[m][half:]]
            fam.threshold[m] = float(np.quantile(held_out, 1.0 if m == PIXELS else 1 - FLAG_RATE))
        return fam

    def _score(self, modality: str, content: Tensor) -> float:
        if not content.numel():
            return 0.0
        if modality == PIXELS:  # colours: Euclidean distance to the nearest bank colour
            content = content[::-(-len(content) // SAMPLE_PIXELS)]  # (<= SAMPLE_PIXELS, 3): 16 MB of distances
            nearest = torch.cdist(content, self.bank[PIXELS]).amin(1)
        else:
            similarity = (content @ self.bank[modality].T).amax(1)  # (n,) cosine of the nearest bank token
            nearest = (2 - 2 * similarity).clamp_min(0).sqrt()  # unit vectors: Euclidean distance from the cosine
        return float(torch.quantile(nearest, QUANTILE))

    def pixel_score(self, image) -> float:
        """The image's own colours' distance from the training scenes' (higher: less familiar)."""
        return self._score(PIXELS, pixel_colours(image, self.pixel_size))

    def score(self, t: ModalityTokens, item: int = 0) -> float:
        """The input's distance from the training distribution (higher: less familiar)."""
        return self._score(t.modality, _content(t, item).to(self.bank[t.modality].device))

    def notices(self, tokens: dict[str, ModalityTokens], item: int = 0, image=None) -> list[str]:
        """A sentence per input (image, clip) that is unlike the training scenes: by its encoder tokens, or
        for `image` (the picture given, PIL or array) by its pixel colours."""
        out = []
        for m, t in tokens.items():
            why = []
            if m in self.bank and (s := self.score(t, item)) > self.threshold[m]:
                why.append(f"its encoder tokens lie {s:.2f} from the nearest training token, at the 90th percentile; "
                           f"99 in 100 held-out scenes stay below {self.threshold[m]:.2f}")
            if m == "image" and image is not None and PIXELS in self.bank:
                p = self.pixel_score(image)
                if p > self.threshold[PIXELS]:
                    why.append(f"its colours lie {p:.2f} from the nearest training-scene colour, at the 90th "
                               f"percentile; every held-out scene stays within {self.threshold[PIXELS]:.2f}")
            if why:
                out.append(f"this {WHAT[m]} is unlike the scenes the model was trained on ({'; and '.join(why)}): "
                           "its maps and its score mean little")
        return out
