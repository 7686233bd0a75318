"""What a training step scores and optimises: candidate captions, negatives and losses.

Each scene is scored against its caption, a few one-attribute hard negatives and easy
negatives (other scenes' captions), drawn by `candidate_captions` (with `NegativeMining`
favouring the kinds of hard negative still got wrong); `matching_loss` is the objective,
`contrastive_loss` and `masked_word_loss` optional extra terms, `matching_accuracy` the
periodic validation. No term looks at an attention map or at any ground truth.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from multimodal.data.pool import ScenePool
from multimodal.data.scenes import change_kinds, every_negative, hard_negative
from multimodal.fusion import CrossAttentionFusion
from multimodal.model import MultimodalModel, score_candidates
from multimodal.train.config import TrainConfig
from multimodal.types import InputError, ModalityTokens

Tensor = torch.Tensor


def candidate_captions(pool: ScenePool, idx: list[int], tc: TrainConfig, rng: np.random.Generator,
                       mining: "NegativeMining | None" = None) -> tuple[list[str], list[str | None], list[str | None]]:
    """Per scene: [caption, hard negatives..., easy negatives...] flattened in that order, and per
    scene its negatives' kinds of change and their `change_key`s (None for an easy negative). The
    kinds (and, when it mines values, the changes within each kind) are drawn by `mining`'s weights."""
    type_weights = mining.weights() if mining else None
    value_weights = mining.value_weights() if mining else None
    captions, kinds, keys = [], [], []
    for i in idx:
        s = pool.scenes[i]
        captions.append(s.caption)
        hard = tc.hard_negatives if pool.hard_negatives else 0
        for _ in range(hard):
            caption, _, change = hard_negative(s, rng, type_weights=type_weights, binding=tc.binding_negatives,
                                               repeat=tc.repeat_negatives, value_weights=value_weights)
            captions.append(caption)
            kinds.append(change["type"])
            keys.append(change["key"])
        for _ in range(tc.hard_negatives + tc.easy_negatives - hard):
            captions.append(other_caption(pool, i, rng))
            kinds.append(None)
            keys.append(None)
    return captions, kinds, keys


class NegativeMining:
    """Running error rate per kind of hard negative; draw weights favour the kinds still got wrong.

    A kind's weight is (error + 0.02) ** strength: strength 0 draws kinds uniformly (and draws
    no differently from plain `hard_negative`), 1 in proportion to the error. Errors are
    exponential moving averages (factor 0.98 per negative seen) starting at 0.5 (chance).
    `counts` says what is wrong: "rank", a negative scored at or above its scene's true caption;
    "match", that or a negative scored as a match (logit > 0, p > 0.5: what the app reads).
    With `values`, the same running error per change within a kind (`change_key`: a star called
    a cross is one change, a star called a circle another) weighs which change of the drawn kind
    is made; a change starts from its kind's error when first seen, and weighs as its kind until
    then (so rare changes are not drawn for being new). Without it, the change within the kind
    is drawn uniformly, as before.
    """

    def __init__(self, strength: float, counts: str = "rank", values: bool = False):
        self.strength = strength
        self.counts = counts
        self.values = values
        self.error: dict[str, float] = {}
        self.value_error: dict[str, float] = {}

    def weights(self) -> dict[str, float] | None:
        if not self.strength:
            return None
        return {k: (e + 0.02) ** self.strength for k, e in self.error.items()}

    def value_weights(self) -> dict[str, float] | None:
        """Each change's weight, and each kind's (that of its changes not yet seen), for `hard_negative`."""
        if not (self.strength and self.values):
            return None
        return {**self.weights(), **{k: (e + 0.02) ** self.strength for k, e in self.value_error.items()}}

    def update(self, scores: Tensor, kinds: list[str | None], keys: list[str | None] | None = None) -> None:
        """scores (B, per_scene), true caption first; kinds (and keys, their `change_key`s): per scene its
        negatives', flattened."""
        wrong = scores[:, 1:] >= scores[:, :1]
        if self.counts == "match":
            wrong |= scores[:, 1:] > 0
        wrong = wrong.flatten().tolist()
        if self.values and keys is not None:  # a change first seen starts from its kind's error
            for kind, key, w in zip(kinds, keys, wrong):
                if key is not None:
                    before = self.value_error.get(key, self.error.get(kind, 0.5))
                    self.value_error[key] = 0.98 * before + 0.02 * float(w)
        for kind, w in zip(kinds, wrong):
            if kind is not None:
                self.error[kind] = 0.98 * self.error.get(kind, 0.5) + 0.02 * float(w)


def other_caption(pool: ScenePool, i: int, rng: np.random.Generator) -> str:
    """A caption of another item that differs from item i's (an easy negative)."""
    own = pool.scenes[i].caption
    j, tries = int(rng.integers(len(pool.scenes))), 1
    while pool.scenes[j].caption == own:
        if tries % 64 == 0 and all(s.caption == own for s in pool.scenes):  # only then look at every item
            raise InputError("every item has the same caption: nothing to contrast with")
        j, tries = int(rng.integers(len(pool.scenes))), tries + 1
    return pool.scenes[j].caption


def every_captions(pool: ScenePool, idx: list[int], kinds: tuple[str, ...]) -> tuple[list[str], Tensor]:
    """Per scene of `idx`, every one-attribute change of `kinds` its caption allows (`every_negative`),
    flattened scene by scene, each scene's padded to the batch's largest count with its true caption:
    (captions, (B, count) bool, False where a slot is padding). Draws nothing at random."""
    changes = [[c for kind in kinds for c, _, _ in every_negative(pool.scenes[i], kind)] for i in idx]
    count = max(map(len, changes))
    captions = [c for i, own in zip(idx, changes) for c in own + [pool.scenes[i].caption] * (count - len(own))]
    valid = torch.tensor([[k < len(own) for k in range(count)] for own in changes], dtype=torch.bool)
    return captions, valid.view(len(idx), count)


def matching_loss(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """Softmax over [positive, negatives...] plus a calibrated match/no-match term. `valid` ((B, P)
    bool): the candidates that count (the others, padding, are left out of both terms)."""
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1
    if valid is None:
        return F.cross_entropy(scores, target) + F.binary_cross_entropy_with_logits(scores, labels)
    bce = F.binary_cross_entropy_with_logits(scores, labels, reduction="none")
    return (F.cross_entropy(scores.masked_fill(~valid, float("-inf")), target)
            + bce[valid].sum() / valid.sum().clamp_min(1))


def best_cosine(t: Tensor, k: Tensor, k_mask: Tensor | None, all_pairs: bool) -> Tensor:
    """Each caption token's best cosine among a scene's keys `k (B, Nk, D)`: with `all_pairs`, every
    caption `t (Bt, Nt, D)` against every scene, `(Bt, B, Nt)`; else `t (B, P, Nt, D)`, scene b's own
    P candidates against scene b, `(B, P, Nt)`.

    The (..., Nt, Nk) similarities are computed without autograd only to find each token's best key;
    the gradient flows through that one key's cosine, recomputed: the value and gradient of
    `amax` over the keys (which sends all of it to the maximum), without a backward pass through
    the full similarity tensor. `k_mask` (B, Nk) excludes keys (None: every key counts)."""
    scenes = torch.arange(k.shape[0], device=k.device)
    with torch.no_grad():
        if all_pairs:
            sim, mask = torch.einsum("itd,jkd->ijtk", t, k), None if k_mask is None else k_mask[None, :, None]
        else:
            sim, mask = torch.einsum("bptd,bkd->bptk", t, k), None if k_mask is None else k_mask[:, None, None]
        idx = (sim if mask is None else sim.masked_fill(~mask, -2.0)).argmax(-1)  # (..., Nt)
    if all_pairs:  # caption i against scene j
        return (t[:, None] * k[scenes[None, :, None], idx]).sum(-1)  # picked keys (Bt, B, Nt, D)
    return (t * k[scenes[:, None, None], idx]).sum(-1)  # picked keys (B, P, Nt, D)


def contrastive_loss(model: MultimodalModel, tokens: dict[str, ModalityTokens], per_scene: int,
                     temperature: float, hard_weight: float = 0.0, per_modality: bool = False) -> Tensor:
    """In-batch late-interaction contrastive term (FILIP, Yao et al. 2021) on the encoder tokens.

    Each scene's true caption against every scene in the batch: a caption's content tokens,
    projected by the fusion block's input projections and L2-normalised, each take their best
    cosine match among the scene's image/audio tokens; the mean is the pair's similarity.
    Cross-entropy both ways over the batch. With `hard_weight`, also cross-entropy of each
    scene's own candidates (true caption first, then its negatives) against that scene: a
    one-attribute negative ("a red star" for a red circle) must find a worse match among the
    scene's tokens, which the batch's other scenes rarely demand. Only encoder tokens enter:
    no attention map does.

    `per_modality`: the term once per modality, each caption token taking its best match among that
    modality's tokens only, and the terms averaged. With one max over image and audio tokens together,
    a start whose audio tokens match caption words sooner can send every word's gradient to audio:
    the image tokens never win a max, so they never learn (measured on a stalled start of the
    default: 9.5% of caption tokens' best key was an image token, against 69% in runs that ground).
    """
    fusion = model.fusion
    text = tokens["text"]  # per_scene captions per scene, true caption first; the scene's tokens once

    def captions(rows: slice) -> tuple[Tensor, Tensor]:
        """Projected, L2-normalised caption tokens (N, Nt, D) and their content mask (N, Nt)."""
        t = F.normalize(fusion.input_proj["text"](text.tokens[rows]), dim=-1)
        return t, (text.mask & ~text.special)[rows]

    true = captions(slice(None, None, per_scene))  # the true captions: (B, Nt, D), (B, Nt)
    every = captions(slice(None)) if hard_weight and per_scene > 1 else None  # every candidate, (B*P, ...)
    present = [m for m in ("image", "audio") if m in tokens]
    groups = [[m] for m in present] if per_modality else [present]
    return sum(_contrastive_term(fusion, tokens, g, true, every, per_scene, temperature, hard_weight)
               for g in groups) / len(groups)


def _contrastive_term(fusion: CrossAttentionFusion, tokens: dict[str, ModalityTokens], modalities: list[str],
                      true: tuple[Tensor, Tensor], every: tuple[Tensor, Tensor] | None, per_scene: int,
                      temperature: float, hard_weight: float) -> Tensor:
    """`contrastive_loss` with the keys of `modalities` (their tokens joined per scene), given the projected
    true captions and, for the hard term, every candidate (`contrastive_loss`'s `captions`)."""
    keys, k_mask = [], []
    for m in modalities:
        keys.append(F.normalize(fusion.input_proj[m](tokens[m].tokens), dim=-1))
        k_mask.append(tokens[m].mask & ~tokens[m].special)
    k, k_mask = torch.cat(keys, 1), torch.cat(k_mask, 1)  # (B, Nk, D), (B, Nk)
    if bool((k_mask == k_mask[:1]).all()):  # the same keys count in every scene (same-size inputs): keep only those
        k, k_mask = k[:, k_mask[0]], None  # no masked entries in the (B, B, Nt, Nk) similarities

    def pair_similarity(best: Tensor, tm: Tensor) -> Tensor:
        """(..., Nt) each token's best cosine -> (...,) the mean over content tokens."""
        tm = tm.to(best.dtype)
        return (best * tm).sum(-1) / tm.sum(-1).clamp_min(1)

    t, t_mask = true  # (B, Nt, D), (B, Nt)
    best = best_cosine(t, k, k_mask, all_pairs=True)  # (B_text, B_scene, Nt)
    pair = pair_similarity(best, t_mask[:, None, :])  # (B_text, B_scene)
    target = torch.arange(pair.shape[0], device=pair.device)
    logits = pair / temperature
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    if every is not None:
        B = k.shape[0]
        t_all, m_all = every  # (B*P, Nt, D), P = per_scene
        t_own = t_all.view(B, per_scene, *t_all.shape[1:])  # (B, P, Nt, D)
        best = best_cosine(t_own, k, k_mask, all_pairs=False)  # (B, P, Nt)
        own = pair_similarity(best, m_all.view(B, per_scene, -1))  # (B, P): candidate p against scene b
        loss = loss + hard_weight * F.cross_entropy(own / temperature, torch.zeros_like(target))
    return loss


def masked_word_loss(model: MultimodalModel, tokens: dict[str, ModalityTokens], captions: list[str],
                     per_scene: int, rate: float, rng: np.random.Generator) -> Tensor:
    """Masked words of each scene's true caption, predicted from what their queries gather.

    A share `rate` of each caption's content tokens (at least one) become [MASK]; the caption
    runs through the text encoder and the fusion block against its own scene, and each masked
    position's fused query scores every vocabulary word with the match head's own bilinear form:
    <match_gathered(fused query), match_asked(input_proj(word embedding))>, so no parameter is
    added. "a red [MASK]" can only be completed from the scene: the query must find the red
    object and read its shape (the masked-language-modelling term of ALBEF, Li et al. 2021). The
    loss sees words, never an attention map or any ground truth.
    """
    text = model.encoders["text"]
    mask_id = text.tokenizer.mask_token_id
    if mask_id is None:
        raise InputError(f"masked_word_weight needs a tokenizer with a mask token; {text.spec} has none")
    batch = text.preprocess(captions[::per_scene])
    ids = batch["input_ids"]
    content = batch["attention_mask"].bool() & ~batch["special"]  # (B, N)
    chosen = torch.from_numpy(rng.random(ids.shape) < rate) & content
    for b in torch.nonzero(~chosen.any(1) & content.any(1)).flatten().tolist():  # none drawn: mask one
        options = torch.nonzero(content[b]).flatten()
        chosen[b, options[int(rng.integers(len(options)))]] = True
    targets = ids[chosen].to(model.device)  # (M,)
    batch = {**batch, "input_ids": ids.masked_fill(chosen, mask_id)}
    fused_in = {m: t for m, t in tokens.items() if m != "text"}  # the scenes' tokens, once each
    fused_in["text"] = text(batch)
    fused = model.fusion(fused_in)
    words = model.match_asked(model.fusion.input_proj["text"](text.model.get_input_embeddings().weight))  # (V, D)
    gathered = model.match_gathered(fused.queries[chosen.to(fused.queries.device)])  # (M, D)
    return F.cross_entropy(gathered @ words.T / words.shape[-1] ** 0.5, targets)


@torch.no_grad()
def matching_accuracy(model: MultimodalModel, pool: ScenePool, seed: int, batch_size: int = 64) -> dict:
    """Pairwise accuracy: the true caption outscores a one-attribute hard negative (for manifest
    rows: another row's caption); plus thresholded accuracy (sigmoid 0.5) over both."""
    model.eval()
    rng = np.random.default_rng(seed)
    wins, correct, total = 0, 0, 0
    for start in range(0, len(pool.scenes), batch_size):
        idx = list(range(start, min(start + batch_size, len(pool.scenes))))
        caps = []
        for i in idx:
            negative = (hard_negative(pool.scenes[i], rng)[0] if pool.hard_negatives
                        else other_caption(pool, i, rng))
            caps += [pool.scenes[i].caption, negative]
        scores, _ = score_candidates(model, pool.batch(model, idx), caps, 2)
        wins += int((scores[:, 0] > scores[:, 1]).sum())
        correct += int((scores[:, 0] > 0).sum() + (scores[:, 1] <= 0).sum())
        total += len(idx)
    return {"pairwise_accuracy": wins / total, "threshold_accuracy": correct / (2 * total), "scenes": total}


def balanced_accuracy(positive: np.ndarray, negative: np.ndarray, thresholds) -> np.ndarray:
    """Per threshold t ("match" when score > t): the mean of the share of `positive` scores
    accepted and the share of `negative` scores rejected."""
    t = np.atleast_1d(np.asarray(thresholds, dtype=float))[:, None]
    return ((positive[None, :] > t).mean(1) + (negative[None, :] <= t).mean(1)) / 2


def best_threshold(positive: np.ndarray, negative: np.ndarray) -> tuple[float, float]:
    """(t, balanced accuracy): the score threshold t ("match" when score > t) that best separates
    `positive` from `negative` scores by `balanced_accuracy`. Candidates are the midpoints between
    neighbouring distinct scores (and one beyond each end); among equally good ones, the middle one
    (the upper middle of an even number)."""
    values = np.unique(np.concatenate([positive, negative]))
    candidates = np.concatenate([[values[0] - 1.0], (values[1:] + values[:-1]) / 2, [values[-1] + 1.0]])
    balanced = balanced_accuracy(positive, negative, candidates)
    best = np.flatnonzero(balanced == balanced.max())
    i = int(best[len(best) // 2])
    return float(candidates[i]), float(balanced[i])


@torch.no_grad()
def calibrate_match_bias(model: MultimodalModel, pool: ScenePool, seed: int, negatives: int = 3,
                         batch_size: int = 32, repeat: bool = False) -> dict:
    """Set the match decision (p = 0.5) where it best separates held-out true captions from their
    one-attribute negatives, by shifting the match logit's bias (Platt-style threshold calibration).

    Each of `pool`'s scenes is scored with its true caption and `negatives` one-attribute negatives
    of different kinds where the scene allows (`change_kinds`, REPEAT among them with `repeat`); the threshold with the best
    balanced accuracy (`best_threshold`) becomes 0 by adding its negative to the last bias of the
    match head, which shifts every caption's logit by the same amount (the soft minimum over
    queries commutes with a constant; with `match_order` its order items' bias shifts too). Rankings, and so pairwise accuracy and every attention map,
    are unchanged. Scenes without hard negatives (manifest rows) are left alone: returns {} then.
    """
    if not pool.hard_negatives:
        return {}
    model.eval()
    rng = np.random.default_rng(seed)
    pos, neg = [], []
    per_scene = 1 + negatives
    for start in range(0, len(pool.scenes), batch_size):
        idx = list(range(start, min(start + batch_size, len(pool.scenes))))
        caps = []
        for i in idx:
            scene = pool.scenes[i]
            kinds = change_kinds(scene, repeat=repeat)
            drawn = rng.choice(len(kinds), negatives, replace=len(kinds) < negatives)
            caps += [scene.caption] + [hard_negative(scene, rng, change_type=kinds[k])[0] for k in drawn]
        scores, _ = score_candidates(model, pool.batch(model, idx), caps, per_scene)
        pos.append(scores[:, 0].float().cpu().numpy())
        neg.append(scores[:, 1:].float().cpu().numpy().ravel())
    positive, negative = np.concatenate(pos), np.concatenate(neg)
    before = balanced_accuracy(positive, negative, 0.0)[0]
    threshold, after = best_threshold(positive, negative)
    model.match_head[-1].bias.sub_(threshold)
    if model.match_order:  # the order items too, so that every item of the soft minimum shifts alike
        model.order_bias.sub_(threshold)
    return {"shift": -threshold, "scenes": len(positive), "negatives": len(negative),
            "balanced_accuracy_before": float(before), "balanced_accuracy_after": after,
            "true_matched_after": float((positive > threshold).mean()),
            "negatives_rejected_after": float((negative <= threshold).mean())}
