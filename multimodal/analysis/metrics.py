"""Per-head statistics of cross-attention maps (docs/metrics.md sections 1 and 2). Pure functions over tensors.

Conventions: `A` is `(B, H, Nq, Nk)` post-attention weights whose rows sum to 1 over the
valid keys, `key_mask (B, Nk)` and `query_mask (B, Nq)` are bool with True = real token,
`N_b` = number of valid keys of item b. Every head score is a mean over the valid queries
of an item, then a mean over the items (items without a valid query are left out; a head
with nothing to average is NaN). Arithmetic is fp32 whatever the maps' dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from multimodal.types import AttentionMaps, InputError

JS_SMOOTHING = 0.001  # Clark et al. head_distances.py: p' = 0.999 p + 0.001 / n
MIN_MODALITY_MASS = 1e-6  # rows with less mass than this inside a modality have no spread
LINKAGES = ("single", "average", "complete")


# ---------------------------------------------------------------------------------------
# Averaging: over valid queries, then over items
# ---------------------------------------------------------------------------------------


def mean_over_queries(x: Tensor, valid: Tensor) -> Tensor:
    """`x (B, H, Nq)` and `valid` broadcastable to it -> `(H,)`: mean over valid queries, then items.

    Invalid entries are never read (they may hold NaN). An item with no valid query for a
    head does not count for that head; a head valid nowhere is NaN.
    """
    valid = valid.expand_as(x)
    x = x.float().masked_fill(~valid, 0.0)
    count = valid.sum(-1)  # (B, H)
    per_item = x.sum(-1) / count.clamp_min(1)  # (B, H)
    has = count > 0  # (B, H)
    return (per_item * has).sum(0) / has.sum(0)  # (H,), 0/0 = NaN where no item counts


def _key_mask4(key_mask: Tensor) -> Tensor:
    return key_mask[:, None, None, :]  # (B, 1, 1, Nk)


def _query_valid(query_mask: Tensor) -> Tensor:
    return query_mask[:, None, :]  # (B, 1, Nq)


# ---------------------------------------------------------------------------------------
# Entropy and confidence
# ---------------------------------------------------------------------------------------


def entropy_per_query(A: Tensor, key_mask: Tensor, normalise: bool = True, smoothing: float = 0.0) -> Tensor:
    """`(B, H, Nq)` entropy `-sum_j A ln A` over each item's valid keys (natural log, fp32 xlogy).

    With `normalise`, divided by `ln N_b` so a uniform row scores 1 (an item with one key
    scores 0). `smoothing=s` first mixes each row with the uniform over the item's N_b
    valid keys, `(1 - s) A + s / N_b` (Clark et al. use s = 1e-4); the default is none, and
    exact zeros (sparse attention kinds) contribute 0 through `xlogy`.
    """
    km = _key_mask4(key_mask)  # (B, 1, 1, Nk)
    n = key_mask.sum(-1).float()  # (B,)
    p = A.float().masked_fill(~km, 0.0)  # (B, H, Nq, Nk)
    if smoothing:
        p = ((1 - smoothing) * p + smoothing / n[:, None, None, None]).masked_fill(~km, 0.0)
    h = -torch.xlogy(p, p).sum(-1)  # (B, H, Nq)
    if normalise:
        ln_n = n.log()[:, None, None]  # (B, 1, 1)
        h = torch.where(ln_n > 0, h / ln_n.clamp_min(1e-12), torch.zeros_like(h))
    return h


def entropy(A: Tensor, key_mask: Tensor, query_mask: Tensor, normalise: bool = True,
            smoothing: float = 0.0) -> Tensor:
    """`(H,)` mean entropy per head (docs/metrics.md section 1): per query, mean over valid queries, then items."""
    return mean_over_queries(entropy_per_query(A, key_mask, normalise, smoothing), _query_valid(query_mask))


def confidence_per_query(A: Tensor, key_mask: Tensor, scaled: bool = False) -> Tensor:
    """`(B, H, Nq)` largest weight of each row; `scaled` multiplies by N_b (uniform row = 1)."""
    top = A.float().masked_fill(~_key_mask4(key_mask), 0.0).amax(-1)  # (B, H, Nq)
    if scaled:
        top = top * key_mask.sum(-1).float()[:, None, None]
    return top


def confidence(A: Tensor, key_mask: Tensor, query_mask: Tensor) -> Tensor:
    """`(H,)` mean max weight (Voita et al. 2019). Not comparable across key counts: see `scaled_confidence`."""
    return mean_over_queries(confidence_per_query(A, key_mask), _query_valid(query_mask))


def scaled_confidence(A: Tensor, key_mask: Tensor, query_mask: Tensor) -> Tensor:
    """`(H,)` mean of `N_b * max_j A`: 1 for a uniform head, N_b for a one-hot head, any key count."""
    return mean_over_queries(confidence_per_query(A, key_mask, scaled=True), _query_valid(query_mask))


# ---------------------------------------------------------------------------------------
# Spread inside one modality (cross-attention has no query position: spread around the centroid)
# ---------------------------------------------------------------------------------------


def _spread(a: Tensor, coords: Tensor) -> tuple[Tensor, Tensor]:
    """`a (..., K)` non-negative, `coords (K, d)` -> (spread, mass), each `(...)`.

    Renormalises `p = a / sum a`, centroid `mu = sum_j p_j c_j`, spread `sum_j p_j |c_j - mu|`.
    """
    mass = a.sum(-1)  # (...)
    p = a / mass.clamp_min(torch.finfo(a.dtype).tiny)[..., None]  # (..., K)
    mu = p @ coords  # (..., d)
    dist = (coords - mu[..., None, :]).norm(dim=-1)  # (..., K)
    return (p * dist).sum(-1), mass


def spatial_spread_per_query(A_img: Tensor, patch_size_px: float | Sequence[float]) -> tuple[Tensor, Tensor]:
    """`A_img (B, H, Nq, gh, gw)` -> (spread in px, mass in the image), each `(B, H, Nq)`."""
    gh, gw = A_img.shape[-2:]
    ph, pw = (float(patch_size_px),) * 2 if isinstance(patch_size_px, (int, float)) else map(float, patch_size_px)
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float32) * ph,
                            torch.arange(gw, dtype=torch.float32) * pw, indexing="ij")  # (gh, gw) each, px
    coords = torch.stack([ys, xs], -1).reshape(gh * gw, 2).to(A_img.device)  # (gh*gw, 2)
    return _spread(A_img.float().flatten(-2).clamp_min(0), coords)  # (B, H, Nq) x 2


def spatial_spread(A_img: Tensor, patch_size_px: float | Sequence[float], query_mask: Tensor,
                   min_mass: float = MIN_MODALITY_MASS) -> Tensor:
    """`(H,)` weighted spread of each head's image attention around its centroid, in pixels.

    `A_img (B, H, Nq, gh, gw)` is the weight on each patch (e.g. `maps.image_maps(layer)`:
    special tokens already dropped). Each row is renormalised within the image, the
    centroid `mu = sum_j p_j g_j` taken over patch positions `g_j` (pixels, `patch_size_px`
    = P or (ph, pw)), and `spread = sum_j p_j |g_j - mu|` (docs/metrics.md section 1, [derived] cross-attention
    form of ViT mean attention distance). Rows with image mass <= `min_mass` are left out.
    """
    spread, mass = spatial_spread_per_query(A_img, patch_size_px)
    return mean_over_queries(spread, _query_valid(query_mask) & (mass > min_mass))


def temporal_spread_per_query(A_aud: Tensor, times: Tensor | Sequence[float]) -> tuple[Tensor, Tensor]:
    """`A_aud (B, H, Nq, T)` -> (spread in seconds, mass in the audio), each `(B, H, Nq)`."""
    t = torch.as_tensor(times, dtype=torch.float32, device=A_aud.device)[:, None]  # (T, 1)
    return _spread(A_aud.float().clamp_min(0), t)


def temporal_spread(A_aud: Tensor, times: Tensor | Sequence[float], query_mask: Tensor,
                    min_mass: float = MIN_MODALITY_MASS) -> Tensor:
    """`(H,)` weighted spread of each head's audio attention around its centroid time, in seconds.

    `A_aud (B, H, Nq, T)` is the weight per time column (e.g. `maps.audio_maps(layer)`:
    padding columns are zero), `times (T,)` the column centres. Same recipe as
    `spatial_spread`: `sum_t p_t |t - mu|` with `p` renormalised within the audio.
    """
    spread, mass = temporal_spread_per_query(A_aud, times)
    return mean_over_queries(spread, _query_valid(query_mask) & (mass > min_mass))


# ---------------------------------------------------------------------------------------
# Functions of AttentionMaps (they pick the masks and geometry out of the maps)
# ---------------------------------------------------------------------------------------


def maps_query_mask(maps: AttentionMaps, content_queries: bool = False) -> Tensor:
    """`(B, Nq)` the queries to average over: valid ones, without CLS/SEP when `content_queries`."""
    qm = maps.content_queries() if content_queries else maps.query_mask
    return qm


def modality_share(maps: AttentionMaps, layer: int, content_queries: bool = False) -> dict[str, Tensor]:
    """modality -> `(h,)` each head's mean share of attention mass on that modality's keys.

    Heads are `maps.heads[layer]`. Special keys (CLS, registers) count for their modality.
    """
    valid = _query_valid(maps_query_mask(maps, content_queries))
    return {m: mean_over_queries(s, valid) for m, s in maps.modality_share(layer).items()}


def uniform_modality_share(maps: AttentionMaps, layer: int, content_queries: bool = False) -> dict[str, Tensor]:
    """modality -> `(h,)` the share a uniform head would give each modality: per item, that modality's
    valid keys over all valid keys, averaged over the same queries and items as `modality_share`.

    The chance level a head's share is read against (docs: "modality share against chance"): with 65
    image keys and 116 audio keys a uniform head already puts 0.64 of its perceptual mass on audio.
    """
    km = maps.key_mask.float()  # (B, Nk)
    total = km.sum(-1).clamp_min(1)  # (B,)
    valid = _query_valid(maps_query_mask(maps, content_queries))  # (B, 1, Nq)
    shape = (km.shape[0], len(maps.heads[layer]), valid.shape[-1])  # (B, h, Nq)
    return {m: mean_over_queries((km[:, a:b].sum(-1) / total)[:, None, None].expand(shape), valid)
            for m, (a, b) in maps.segments.items()}


def modality_spread(maps: AttentionMaps, layer: int, content_queries: bool = False) -> dict[str, Tensor]:
    """`{"image": (h,) px, "audio": (h,) s}` for the modalities among the keys (specials dropped)."""
    qm = maps_query_mask(maps, content_queries)
    out = {}
    if "image" in maps.segments:
        out["image"] = spatial_spread(maps.image_maps(layer), maps.key_geometry["image"].patch_size, qm)
    if "audio" in maps.segments:
        out["audio"] = temporal_spread(maps.audio_maps(layer), maps.key_geometry["audio"].times, qm)
    return out


def head_metric_table(maps: AttentionMaps, layer: int, content_queries: bool = False) -> list[dict]:
    """One row per head of `layer`: entropy (normalised), confidence, scaled confidence,
    `share_<modality>` for each key modality and `uniform_share_<modality>` (a uniform head's: chance), `spread_px` / `spread_s` when image / audio keys exist.
    """
    A = maps.weights[layer]  # (B, h, Nq, Nk)
    qm = maps_query_mask(maps, content_queries)
    cols = {
        "entropy": entropy(A, maps.key_mask, qm),
        "confidence": confidence(A, maps.key_mask, qm),
        "scaled_confidence": scaled_confidence(A, maps.key_mask, qm),
    }
    cols.update({f"share_{m}": s for m, s in modality_share(maps, layer, content_queries).items()})
    cols.update({f"uniform_share_{m}": s for m, s in uniform_modality_share(maps, layer, content_queries).items()})
    units = {"image": "spread_px", "audio": "spread_s"}
    cols.update({units[m]: s for m, s in modality_spread(maps, layer, content_queries).items()})
    return [{"layer": layer, "head": head, **{k: float(v[i]) for k, v in cols.items()}}
            for i, head in enumerate(maps.heads[layer])]


# ---------------------------------------------------------------------------------------
# Diversity and redundancy between heads (docs/metrics.md section 2)
# ---------------------------------------------------------------------------------------


def js_divergence_matrix(A: Tensor, key_mask: Tensor, query_mask: Tensor,
                         smoothing: float = JS_SMOOTHING) -> Tensor:
    """`(H, H)` Jensen-Shannon divergence between every pair of heads' rows (Clark et al. 2019).

    Each row is smoothed over the item's N_b valid keys, `p' = (1 - s) p + s / N_b` (not over
    the padded key count), then `JS = 1/2 sum_j [p ln(p/m) + q ln(q/m)]`, `m = (p + q)/2`,
    natural log (max ln 2). Averaged over valid queries, then items (Clark et al. sum over
    queries and documents instead: same ranking, different scale). Symmetric, zero
    diagonal. Heads are compared over identical query/key sets; to compare heads of
    several layers, concatenate their maps along H.
    """
    B, H, Nq, Nk = A.shape
    km = _key_mask4(key_mask)  # (B, 1, 1, Nk)
    n = key_mask.sum(-1).float()[:, None, None, None]  # (B, 1, 1, 1)
    p = ((1 - smoothing) * A.float() + smoothing / n).masked_fill(~km, 0.0)  # (B, H, Nq, Nk)
    plogp = torch.xlogy(p, p)  # (B, H, Nq, Nk)
    valid = _query_valid(query_mask)  # (B, 1, Nq)
    D = torch.zeros(H, H)
    for h in range(H - 1):
        P, Q = p[:, h:h + 1], p[:, h + 1:]  # (B, 1, Nq, Nk), (B, H-h-1, Nq, Nk)
        m = (P + Q) / 2
        kl_pm = (plogp[:, h:h + 1] - torch.xlogy(P, m)).sum(-1)  # (B, H-h-1, Nq)
        kl_qm = (plogp[:, h + 1:] - torch.xlogy(Q, m)).sum(-1)  # (B, H-h-1, Nq)
        js = 0.5 * (kl_pm + kl_qm)
        d = mean_over_queries(js, valid).clamp_min(0)  # (H-h-1,)
        D[h, h + 1:] = d
        D[h + 1:, h] = d
    return D


def redundancy_clusters(D: Tensor, threshold: float, linkage: str = "average") -> list[list[int]]:
    """Agglomerative clustering of heads on the JS distance `sqrt(D)` (a metric; scipy's
    `jensenshannon` returns the same square root).

    Repeatedly merges the two closest clusters while their linkage distance (`single` =
    closest pair, `average` = mean pair, `complete` = farthest pair) is <= `threshold`, in
    sqrt-JS units (at most sqrt(ln 2) ~ 0.83). Ties merge the lowest indices first. Returns
    clusters of head indices (positions along D), each sorted, ordered by their first head.
    """
    if linkage not in LINKAGES:
        raise InputError(f"linkage={linkage!r}: use one of {LINKAGES}")
    n = D.shape[0]
    C = D.double().clamp_min(0).sqrt().clone()  # (n, n) cluster-to-cluster distance
    C.fill_diagonal_(math.inf)
    members = {i: [i] for i in range(n)}
    while len(members) > 1:
        flat = int(C.argmin())
        a, b = divmod(flat, n)
        a, b = min(a, b), max(a, b)
        if C[a, b] > threshold:
            break
        na, nb = len(members[a]), len(members[b])
        if linkage == "single":  # Lance-Williams updates
            row = torch.minimum(C[a], C[b])
        elif linkage == "complete":
            row = torch.maximum(C[a], C[b])
        else:
            row = (na * C[a] + nb * C[b]) / (na + nb)
        C[a], C[:, a] = row, row
        C[b], C[:, b] = math.inf, math.inf
        C[a, a] = math.inf
        members[a] += members.pop(b)
    return sorted(sorted(c) for c in members.values())


def redundancy_summary(D: Tensor, threshold: float, linkage: str = "average") -> dict:
    """Clusters plus the numbers to read them by: mean off-diagonal JS divergence and
    distance (sqrt), and the most similar pair of heads (smallest distance)."""
    n = D.shape[0]
    dist = D.double().clamp_min(0).sqrt()  # (n, n)
    off = ~torch.eye(n, dtype=torch.bool)
    summary = {"clusters": redundancy_clusters(D, threshold, linkage), "threshold": threshold,
               "linkage": linkage, "mean_divergence": math.nan, "mean_distance": math.nan,
               "most_similar_pair": None, "most_similar_distance": math.nan}
    if n > 1:
        i, j = divmod(int(dist.masked_fill(~off, math.inf).argmin()), n)
        summary.update(mean_divergence=float(D.double()[off].mean()), mean_distance=float(dist[off].mean()),
                       most_similar_pair=(min(i, j), max(i, j)), most_similar_distance=float(dist[i, j]))
    return summary
