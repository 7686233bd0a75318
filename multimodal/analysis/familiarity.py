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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from multimodal.data.pool import ScenePool, split_seeds
from multimodal.data.scenes import SceneConfig
from multimodal.types import ModalityTokens

QUANTILE = 0.9  # an input's score: this quantile of its tokens' nearest-neighbour distances
FLAG_RATE = 0.01  # the threshold: the score exceeded by this share of held-out scenes
BANK_TOKENS = 4096  # per modality, drawn at random from the bank scenes' tokens (a request costs ~1 ms)
WHAT = {"image": "image", "audio": "clip"}


def _content(t: ModalityTokens, item: int) -> Tensor:
    """(n, D) L2-normalised content tokens of one item (padding and special tokens left out)."""
    keep = (t.mask & ~t.special)[item]
    return F.normalize(t.tokens[item][keep].float(), dim=-1)


@dataclass
class Familiarity:
    bank: dict[str, Tensor]  # modality -> (M, D) normalised training-distribution tokens
    threshold: dict[str, float]  # modality -> score above which an input is called unfamiliar

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
        fam = cls(bank, {})
        for m in mods:
            held_out = [fam._score(m, t) for t in tokens[m][half:]]
            fam.threshold[m] = float(np.quantile(held_out, 1 - FLAG_RATE))
        return fam

    def _score(self, modality: str, content: Tensor) -> float:
        if not content.numel():
            return 0.0
        similarity = (content @ self.bank[modality].T).amax(1)  # (n,) cosine of the nearest bank token
        nearest = (2 - 2 * similarity).clamp_min(0).sqrt()  # unit vectors: Euclidean distance from the cosine
        return float(torch.quantile(nearest, QUANTILE))

    def score(self, t: ModalityTokens, item: int = 0) -> float:
        """The input's distance from the training distribution (higher: less familiar)."""
        return self._score(t.modality, _content(t, item).to(self.bank[t.modality].device))

    def notices(self, tokens: dict[str, ModalityTokens], item: int = 0) -> list[str]:
        """A sentence per input (image, clip) that is unlike the training scenes."""
        out = []
        for m, t in tokens.items():
            if m not in self.bank:
                continue
            s = self.score(t, item)
            if s > self.threshold[m]:
                out.append(f"this {WHAT[m]} is unlike the scenes the model was trained on (its encoder tokens lie "
                           f"{s:.2f} from the nearest training token, at the 90th percentile; 99 in 100 held-out "
                           f"scenes stay below {self.threshold[m]:.2f}): its maps and its score mean little")
        return out
