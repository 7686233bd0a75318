"""Explanations beyond raw weights (docs/metrics.md section 4): attention rollout and gradient relevance.

`attention_rollout` propagates an encoder's self-attention through its layers (Abnar &
Zuidema 2020). `gradient_relevance` scores every key token of the fusion block for the
match score (Chefer et al. 2021, adapted to our cross-attention), `raw_attention_map`
is the plain-attention baseline to compare it with. Both return a `KeyRelevance`, whose
`maps` is an `AttentionMaps` with one pseudo-head and one pseudo-query, so the maps'
geometry (image grid, audio time columns, text tokens) and renderers apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from multimodal.types import AttentionMaps, InputError, ModalityTokens

HEAD_FUSIONS = ("mean", "max", "min")
ScoreFn = Callable[[Mapping[str, ModalityTokens]], "tuple[Tensor, AttentionMaps]"]  # tokens -> (score (B,), maps)


# ---------------------------------------------------------------------------------------
# Attention rollout (Abnar & Zuidema 2020)
# ---------------------------------------------------------------------------------------


def attention_rollout(self_attentions: Sequence[Tensor], add_residual: bool = True, discard_ratio: float = 0.0,
                      head_fusion: str = "mean") -> Tensor:
    """`(B, N, N)` rollout of per-layer self-attention `(B, h, N, N)`, first layer first.

    Per layer: `A = fuse_h A_l` (mean, or max/min as in vit-explain); optionally zero the
    `discard_ratio` fraction of smallest entries of each item's matrix; `A_hat = (A + I)`
    (with `add_residual`) divided by its ROW sums (keepdim: dividing by `sum(-1)` without
    it normalises columns, wrong once entries are discarded). `R_1 = A_hat_1`,
    `R_l = A_hat_l @ R_{l-1}`. Every row of the result sums to 1; row i says how much of
    token i's final representation comes from each input token.
    """
    if not self_attentions:
        raise InputError("attention_rollout needs at least one layer of self-attention")
    if head_fusion not in HEAD_FUSIONS:
        raise InputError(f"head_fusion={head_fusion!r}: use one of {HEAD_FUSIONS}")
    if not 0.0 <= discard_ratio < 1.0:
        raise InputError(f"discard_ratio={discard_ratio}: must be in [0, 1)")
    R = None
    for A in self_attentions:
        assert A.dim() == 4 and A.shape[-1] == A.shape[-2], A.shape
        a = {"mean": lambda x: x.mean(1), "max": lambda x: x.amax(1), "min": lambda x: x.amin(1)}[head_fusion](
            A.float())  # (B, N, N)
        B, N, _ = a.shape
        k = int(N * N * discard_ratio)
        if k:
            flat = a.reshape(B, N * N)  # (B, N*N)
            drop = flat.topk(k, dim=-1, largest=False).indices  # (B, k)
            a = flat.scatter(1, drop, 0.0).view(B, N, N)  # (B, N, N)
        if add_residual:
            a = a + torch.eye(N, device=a.device)
        a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)  # rows sum to 1
        R = a if R is None else a @ R  # (B, N, N)
    return R


# ---------------------------------------------------------------------------------------
# Key relevance for the fusion block
# ---------------------------------------------------------------------------------------


@dataclass
class KeyRelevance:
    """Non-negative relevance of each key token, with the keys' geometry."""

    scores: Tensor  # (B, Nk), zero on padded keys
    maps: AttentionMaps  # weights {0: (B, 1, 1, Nk)}: one pseudo-head, one pseudo-query
    per_layer: dict[int, Tensor]  # layer -> (B, Nk) that layer's term of `scores`

    def by_modality(self, drop_special: bool = True) -> dict[str, Tensor]:
        """modality -> `(B, N_m)` over that modality's keys (special tokens zeroed when asked)."""
        return {m: self.maps.modality_weights(m, 0, drop_special=drop_special)[:, 0, 0] for m in self.maps.segments}

    def image(self) -> Tensor:
        """`(B, gh, gw)` relevance of each image patch (CLS/registers dropped)."""
        return self.maps.image_maps(0)[:, 0, 0]

    def audio(self) -> Tensor:
        """`(B, T)` relevance of each audio time column (summed over frequency bands)."""
        return self.maps.audio_maps(0)[:, 0, 0]

    def text(self) -> Tensor:
        """`(B, N_text)` relevance of each text token (special tokens zeroed)."""
        return self.maps.text_maps(0)[:, 0, 0]


def _as_key_relevance(scores: Tensor, maps: AttentionMaps, per_layer: dict[int, Tensor]) -> KeyRelevance:
    B = scores.shape[0]
    single = AttentionMaps(
        weights={0: scores[:, None, None, :]}, heads={0: [0]}, segments=dict(maps.segments),
        key_mask=maps.key_mask, key_special=maps.key_special, query_source="score",
        query_mask=torch.ones(B, 1, dtype=torch.bool, device=scores.device),
        key_geometry=dict(maps.key_geometry), query_geometry=None, num_heads=1,
        query_special=torch.zeros(B, 1, dtype=torch.bool, device=scores.device))
    return KeyRelevance(scores=scores, maps=single, per_layer=per_layer)


def content_query_weights(maps: AttentionMaps) -> Tensor:
    """`(B, Nq)` uniform weights over each item's valid non-special queries (all valid
    queries for an item that has no content query), each row summing to 1."""
    w = maps.query_mask.clone()
    content = maps.content_queries()
    w = torch.where(content.any(-1, keepdim=True), content, w)
    w = w.float()
    return w / w.sum(-1, keepdim=True).clamp_min(1)


def _query_weights(maps: AttentionMaps, query_weights: Tensor | None) -> Tensor:
    if query_weights is None:
        return content_query_weights(maps)
    assert query_weights.shape == maps.query_mask.shape, (query_weights.shape, maps.query_mask.shape)
    return query_weights.float() * maps.query_mask


def raw_attention_map(maps: AttentionMaps, layers: Sequence[int] | None = None,
                      query_weights: Tensor | None = None) -> KeyRelevance:
    """Plain attention as a key map: `sum_q r_q mean_{l, h} A_l[h, q, :]`, `(B, Nk)`.

    `r_q` defaults to uniform over valid content queries (`content_query_weights`), so each
    item's map sums to 1 over its keys. The baseline `gradient_relevance` is compared with.
    """
    layers = list(maps.layers if layers is None else layers)
    r = _query_weights(maps, query_weights)  # (B, Nq)
    per_layer = {l: torch.einsum("bq,bqk->bk", r, maps.weights[l].detach().float().mean(1)) / len(layers)
                 for l in layers}  # layer -> (B, Nk)
    return _as_key_relevance(sum(per_layer.values()), maps, per_layer)


def model_score_fn(model, head_mask: Tensor | None = None) -> ScoreFn:
    """`tokens -> (score (B,), maps)` for a `MultimodalModel` (its `fuse`, all maps requested)."""
    def score_fn(tokens):
        out = model.fuse(tokens, head_mask=head_mask, return_maps=True)
        return out.score, out.maps
    return score_fn


def gradient_relevance(score_fn: ScoreFn, tokens: Mapping[str, ModalityTokens] | Sequence[ModalityTokens],
                       query_weights: Tensor | None = None, layers: Sequence[int] | None = None) -> KeyRelevance:
    """Gradient-weighted relevance of every key token for the score (Chefer et al. 2021, adapted).

    `score_fn(tokens) -> (score (B,), maps)` runs the model with maps; it is called here
    with grad enabled, which puts the fusion block on its explicit, differentiable path
    (`model_score_fn(model)` builds one for a `MultimodalModel`; use eval mode, and request
    all heads: a head subset is a copy outside the graph). Items are independent, so one
    backward pass of `score.sum()` gives every item its own `dy_b/dA_b`.

    Per layer: `Abar_l = mean_h clamp(dy/dA_l * A_l, min=0)`, `(B, Nq, Nk)`. Then
    `R = sum_l r^T Abar_l`, `(B, Nk)`, with `r (B, Nq)` the query weights (default uniform
    over valid content queries; custom ones are multiplied by the query mask).

    Derivation [derived, docs/metrics.md section 4]: Chefer's rules with s = the queries and k = the keys.
    Init `R^ss = I`, `R^kk = I`, `R^sk = 0`. The keys are never updated inside the block
    (every layer attends to the same key tokens) and never attend to the queries, so
    `R^kk` stays I, `Rbar^kk = rownorm(R^kk - I) + I = I`, and `R^ss += Abar R^ks` adds 0 (R^ks = 0),
    leaving `R^ss = I`. The cross-attention rule `R^sk += (Rbar^ss)^T Abar_l Rbar^kk` then
    reduces to `R^sk = sum_l Abar_l`. Chefer reads the row of the CLS token; our score reads
    the pooled queries (or a soft minimum over them), so the row becomes a weighting `r`
    over queries: `R = r^T R^sk`. Uniform `r` is enough because `dy/dA` already carries
    each query's weight in the score (a query the score ignores has zero gradient). With
    `query_self_attention=True` the queries mix between layers through an attention whose
    weights are not returned; `R^ss = I` then ignores that mixing (an approximation).
    Keys are treated as one modality (concatenated) and split afterwards by `maps.segments`.
    """
    with torch.enable_grad():
        score, maps = score_fn(tokens)
        layers = list(maps.layers if layers is None else layers)
        if not layers:
            raise InputError("the score function returned no attention maps: it must request them (return_maps=True)")
        weights = [maps.weights[l] for l in layers]
        if not all(w.requires_grad for w in weights):
            raise InputError("the maps carry no autograd graph: run the model with grad enabled, "
                             "return_maps=True, and no torch.no_grad/inference_mode around it")
        grads = torch.autograd.grad(score.sum(), weights, allow_unused=True)
    r = _query_weights(maps, query_weights)  # (B, Nq)
    key_mask = maps.key_mask.float()  # (B, Nk)
    per_layer = {}
    for l, w, g in zip(layers, weights, grads):
        if g is None:
            raise InputError(f"the score does not depend on the layer-{l} maps: request the maps of all heads "
                             "(a head subset is a copy outside the graph)")
        cam = (g * w).detach().float().clamp_min(0).mean(1)  # (B, Nq, Nk)
        per_layer[l] = torch.einsum("bq,bqk->bk", r, cam) * key_mask  # (B, Nk)
    return _as_key_relevance(sum(per_layer.values()), maps, per_layer)



def relevance_maps(score: Tensor, maps: AttentionMaps) -> AttentionMaps:
    """Gradient-weighted relevance kept per query, as maps: layer l's one pseudo-head is
    `mean_h clamp(dy/dA_l * A_l, min=0)`, `(B, 1, Nq, Nk)` (the `Abar_l` of `gradient_relevance`
    before the sum over queries), so it is drawn and scored per phrase exactly as a head is.
    `score (B,)` and `maps` (every head) come from one forward pass run with grad enabled."""
    weights = [maps.weights[l] for l in maps.layers]
    if not weights or not all(w.requires_grad for w in weights):
        raise InputError("relevance needs every head's maps with their autograd graph: run with grad enabled "
                         "and return_maps=True")
    grads = torch.autograd.grad(score.sum(), weights, allow_unused=True)
    rel = {l: (torch.zeros_like(w) if g is None else g * w).detach().float().clamp_min(0).mean(1, keepdim=True)
           for l, w, g in zip(maps.layers, weights, grads)}
    return AttentionMaps(weights=rel, heads={l: [0] for l in rel}, segments=maps.segments, key_mask=maps.key_mask,
                         key_special=maps.key_special, query_source=maps.query_source, query_mask=maps.query_mask,
                         key_geometry=maps.key_geometry, query_geometry=maps.query_geometry, num_heads=1,
                         query_special=maps.query_special)


def fusion_rollout(maps: AttentionMaps) -> AttentionMaps:
    """Attention rollout through the fusion layers, per query, as maps: layer l's one pseudo-head is
    the mean over layers 0..l of each layer's head-mean weights, `(B, 1, Nq, Nk)`, rows summing to 1.

    The block's keys never change and never attend, so Chefer's rules (see `gradient_relevance`)
    make the query-to-key relevance the sum of the layers' maps; without gradients that is the sum
    of the head means, divided by the number of layers so rows still sum to 1. The queries' own
    self-attention between layers (`query_self_attention`) is not returned and is ignored, as there.
    Needs every head of every layer up to l."""
    out, running = {}, None
    for n, l in enumerate(sorted(maps.weights), start=1):
        if len(maps.heads[l]) != maps.num_heads:
            raise InputError(f"rollout averages every head: layer {l} holds {len(maps.heads[l])} of {maps.num_heads}")
        layer_mean = maps.weights[l].detach().float().mean(1, keepdim=True)  # (B, 1, Nq, Nk)
        running = layer_mean if running is None else running + layer_mean
        out[l] = running / n
    return AttentionMaps(weights=out, heads={l: [0] for l in out}, segments=maps.segments, key_mask=maps.key_mask,
                         key_special=maps.key_special, query_source=maps.query_source, query_mask=maps.query_mask,
                         key_geometry=maps.key_geometry, query_geometry=maps.query_geometry, num_heads=1,
                         query_special=maps.query_special)
