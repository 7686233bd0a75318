"""The shared multi-head cross-attention fusion block.

Reads top to bottom: the config, the attention kinds (functions from logits to weights),
one cross-attention module with its two paths side by side, a feed-forward, one fusion
layer, and the block that turns `ModalityTokens` into fused queries and `AttentionMaps`.

Queries are either learned latents (Perceiver-style: every head sees all modalities at
once) or the tokens of one modality attending to the others; both are one code path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from multimodal.types import MODALITIES, AttentionMaps, InputError, ModalityTokens, loose_switch

ATTENTION_KINDS = ("softmax", "topk", "sparsemax", "entmax15")
QUERY_SOURCES = ("latents",) + MODALITIES


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusionConfig:
    dim: int = 256  # width of queries and keys inside the block
    heads: int = 8
    layers: int = 2
    query: str = "latents"  # "latents" or the modality whose tokens ask ("text", "image", "audio")
    num_latents: int = 16  # only for query="latents"
    attention: str = "softmax"  # one of ATTENTION_KINDS
    top_k: int = 8  # keys kept per query for attention="topk"
    partial_sort: int = 0  # sparsemax/entmax15: sort only each row's k largest logits first (0: all); exact either way
    query_self_attention: bool = False  # queries also attend to each other (decoder-style) in each layer
    compete: bool = False  # queries compete for keys: softmax over queries first, then rows renormalised (Slot Attention)
    sinks: int = 0  # with compete: learned background queries per head that take keys' shares but are not outputs
    positional: bool = True  # sinusoidal position (index within each modality) added to tokens
    modality_embeddings: bool = True  # a learned vector per modality added to its tokens
    input_dims: Mapping[str, int] = field(default_factory=dict)  # encoder width per modality (default: dim)
    ffn_mult: int = 4
    dropout: float = 0.0

    def __post_init__(self):
        def bad(key, why):
            raise InputError(f"FusionConfig.{key}={getattr(self, key)!r}: {why}")

        if name := loose_switch(self):
            bad(name, "is a switch: write true or false (lower case, as TOML does)")
        if self.dim <= 0 or self.heads <= 0 or self.dim % self.heads:
            bad("dim", f"must be a positive multiple of heads={self.heads}")
        if self.layers <= 0:
            bad("layers", "must be >= 1")
        if self.query not in QUERY_SOURCES:
            bad("query", f"must be one of {QUERY_SOURCES}")
        if self.query == "latents" and self.num_latents <= 0:
            bad("num_latents", "must be >= 1 with latent queries")
        if self.attention not in ATTENTION_KINDS:
            bad("attention", f"must be one of {ATTENTION_KINDS}")
        if self.compete and self.attention != "softmax":
            bad("compete", f"shares keys out with a softmax over queries; it cannot combine with attention="
                           f"{self.attention!r}: use attention='softmax'")
        if self.sinks < 0 or (self.sinks and not self.compete):
            bad("sinks", "background queries only exist in the competition for keys: use compete=True (or sinks=0)")
        if self.top_k <= 0:
            bad("top_k", "must be >= 1")
        if self.partial_sort < 0:
            bad("partial_sort", "must be >= 0 (0 sorts every logit)")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", "must be in [0, 1)")
        for m, d in dict(self.input_dims).items():
            if m not in MODALITIES or int(d) <= 0:
                bad("input_dims", f"keys must be among {MODALITIES} with positive widths")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_dims"] = dict(self.input_dims)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "FusionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown fusion config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**d)

    def input_dim(self, modality: str) -> int:
        return int(dict(self.input_dims).get(modality, self.dim))


@dataclass(frozen=True)
class MapRequest:
    """Which maps to keep: `layers`/`heads` = None means all.

    Only the named heads of the named layers take the explicit path; every other head runs as
    if no maps were asked for (fused SDPA where it is exact), so its weights are never computed.
    """

    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None


# ---------------------------------------------------------------------------------------
# Attention kinds: logits (B, H, Nq, Nk) + key mask (B, 1, 1, Nk) -> weights summing to 1
# ---------------------------------------------------------------------------------------

_MASKED = -1e6  # stands in for -inf in the sort-based kinds (logits are max-shifted first)


def softmax_attention(logits: Tensor, mask: Tensor) -> Tensor:
    if not bool(mask.all()):  # skip a full pass over (B, H, Nq, Nk) when nothing is padded
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(-1)


def topk_attention(logits: Tensor, mask: Tensor, k: int) -> Tensor:
    z = logits.masked_fill(~mask, float("-inf"))
    kth = z.topk(min(k, z.shape[-1]), dim=-1).values[..., -1:]  # (B, H, Nq, 1)
    return z.masked_fill(z < kth, float("-inf")).softmax(-1)


def _shifted(logits: Tensor, mask: Tensor) -> Tensor:
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32, or float64 kept as is
    z = z.masked_fill(~mask, float("-inf"))
    z = z - z.amax(-1, keepdim=True)
    return z.masked_fill(~mask, _MASKED)


def _descending(z: Tensor, k: int) -> Tensor:
    """The k largest values of each row, largest first (k <= 0 or k >= Nk: the whole row sorted)."""
    if 0 < k < z.shape[-1]:
        return z.topk(k, -1).values  # a partial sort
    return z.sort(-1, descending=True).values


def _threshold(z: Tensor, k: int, threshold: Callable[[Tensor], tuple[Tensor, Tensor]]) -> Tensor:
    """Each row's threshold from its k largest values; rows whose support may reach past them
    (support = k) are done again from the whole sorted row, so the result is exact for any k."""
    tau, support = threshold(_descending(z, k))  # (..., 1) each
    if 0 < k < z.shape[-1]:
        unsure = (support == k).squeeze(-1)  # (...,)
        if bool(unsure.any()):
            tau = tau.clone()
            tau[unsure] = threshold(_descending(z[unsure], 0))[0]
    return tau


def _sparsemax_threshold(zs: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted rows (..., n) -> sparsemax threshold tau and support size within them, (..., 1) each."""
    rho = torch.arange(1, zs.shape[-1] + 1, device=zs.device, dtype=zs.dtype)
    cum = zs.cumsum(-1)
    support = (1 + rho * zs > cum).sum(-1, keepdim=True)  # (..., 1)
    return (cum.gather(-1, support - 1) - 1) / support.to(zs.dtype), support


def _entmax15_threshold(zs: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted halved rows (..., n) -> 1.5-entmax threshold and support size within them, (..., 1) each."""
    rho = torch.arange(1, zs.shape[-1] + 1, device=zs.device, dtype=zs.dtype)
    mean = zs.cumsum(-1) / rho
    mean_sq = (zs ** 2).cumsum(-1) / rho
    delta = (1 - rho * (mean_sq - mean ** 2)) / rho
    support = ((mean - delta.clamp_min(0).sqrt()) <= zs).sum(-1, keepdim=True).clamp_min(1)  # (..., 1)
    delta_star = delta.gather(-1, support - 1).clamp_min(1e-12)  # >= 0 up to rounding
    return mean.gather(-1, support - 1) - delta_star.sqrt(), support


class SparsemaxFunction(torch.autograd.Function):
    """Sparsemax (Martins & Astudillo 2016): p = [z - tau]_+, exact, sort-based.

    With `k` > 0 only each row's k largest logits are sorted (a partial sort); rows whose support
    turns out to hold k or more keys are sorted in full, so the result is the same for any k.
    Backward: J = diag(s) - s s^T / |S|, s the indicator of the support S = {p > 0}. A logit
    exactly at tau (p = 0) is outside S and gets no gradient, as in the `entmax` package.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, mask: Tensor, k: int = 0) -> Tensor:
        z = _shifted(logits, mask)
        tau = _threshold(z, k, _sparsemax_threshold)  # (B, H, Nq, 1)
        p = (z - tau).clamp_min(0).to(logits.dtype)  # (B, H, Nq, Nk)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (p,) = ctx.saved_tensors
        s = (p > 0).to(grad.dtype)  # (B, H, Nq, Nk)
        g = grad * s
        return g - s * (g.sum(-1, keepdim=True) / s.sum(-1, keepdim=True)), None, None


class Entmax15Function(torch.autograd.Function):
    """1.5-entmax (Peters et al. 2019): p = [z/2 - tau]_+^2, exact sort-based algorithm.

    `k` > 0: a partial sort, exact for any k, as in `SparsemaxFunction`.
    Backward: J = diag(g) - g g^T / sum(g) with g = sqrt(p), which is 0 off the support
    {p > 0} (a logit exactly at the threshold gets no gradient), as in the `entmax` package.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, mask: Tensor, k: int = 0) -> Tensor:
        z = _shifted(logits, mask) / 2
        tau_star = _threshold(z, k, _entmax15_threshold)  # (B, H, Nq, 1)
        p = (z - tau_star).clamp_min(0) ** 2
        p = (p / p.sum(-1, keepdim=True)).to(logits.dtype)  # exact up to rounding; renormalise it away
        ctx.save_for_backward(p)
        return p

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (p,) = ctx.saved_tensors
        g = p.sqrt()  # (B, H, Nq, Nk)
        v = grad * g
        return v - g * (v.sum(-1, keepdim=True) / g.sum(-1, keepdim=True)), None, None


def sparsemax_attention(logits: Tensor, mask: Tensor, k: int = 0) -> Tensor:
    return SparsemaxFunction.apply(logits, mask, k)


def entmax15_attention(logits: Tensor, mask: Tensor, k: int = 0) -> Tensor:
    return Entmax15Function.apply(logits, mask, k)


def competitive_attention(logits: Tensor, mask: Tensor, query_mask: Tensor, eps: float = 1e-8,
                          sink_logits: Tensor | None = None, groups: int = 1,
                          claimed: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Slot-Attention normalisation (Locatello et al. 2020): each key shares itself out among the
    queries (softmax over queries), then each query's row is renormalised over the keys.

    `mask` (B, 1, 1, Nk) valid keys, `query_mask` (B, 1, Nq, 1) valid queries; padded queries take
    no share (their rows come out uniform over the valid keys). Rows sum to 1 like every kind.
    `sink_logits` (B, H, S, Nk), when given, are background queries that compete for every key
    and are then dropped: a key no real query claims goes to them instead of being spread thin.
    `groups` > 1: the Nq queries are that many independent sets (captions asking about one scene)
    of Nq / groups each, and each set competes for the keys on its own, with its own sinks.
    `claimed=True` also returns each query's claimed share (B, H, Nq): the sum of its shares of the
    valid keys before its row is renormalised, over the number of valid keys (0 for a padded query;
    the real queries' and the sinks' claims sum to 1). A faint query's row looks as peaked as a
    strong one's once renormalised; its claim tells them apart.
    """
    B, H, Nq, Nk = logits.shape
    z = logits.masked_fill(~query_mask, float("-inf")).view(B, H, groups, Nq // groups, Nk)
    if sink_logits is not None:
        sinks = sink_logits[:, :, None].expand(-1, -1, groups, -1, -1)  # (B, H, groups, S, Nk)
        z = torch.cat([z, sinks], dim=-2)  # (B, H, groups, Nq / groups + S, Nk)
    share = z.softmax(-2)[..., : Nq // groups, :].reshape(B, H, Nq, Nk)  # columns sum to <= 1 per group
    weights = (share + eps).masked_fill(~query_mask, 1.0).masked_fill(~mask, 0.0)
    weights = weights / weights.sum(-1, keepdim=True)
    if not claimed:
        return weights
    valid = mask.sum(-1).to(share.dtype)  # (B, 1, 1)
    won = share.masked_fill(~mask, 0.0).sum(-1) / valid  # (B, H, Nq)
    return weights, won.masked_fill(~query_mask[..., 0], 0.0)


def attention_function(cfg: FusionConfig) -> Callable[[Tensor, Tensor], Tensor]:
    if cfg.attention == "topk":
        return lambda logits, mask: topk_attention(logits, mask, cfg.top_k)
    if cfg.attention == "sparsemax":
        return lambda logits, mask: sparsemax_attention(logits, mask, cfg.partial_sort)
    if cfg.attention == "entmax15":
        return lambda logits, mask: entmax15_attention(logits, mask, cfg.partial_sort)
    return softmax_attention


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


def head_runs(heads: Sequence[int]) -> list[slice]:
    """Sorted head indices as contiguous runs: slicing (B, H, N, hd) by a run is a view, never a copy."""
    runs: list[slice] = []
    for h in heads:
        if runs and runs[-1].stop == h:
            runs[-1] = slice(runs[-1].start, h + 1)
        else:
            runs.append(slice(h, h + 1))
    return runs


class CrossAttention(nn.Module):
    """Multi-head attention from queries to keys; maps come back, not through hooks.

    Heads are attended in groups (`attend_heads`): the heads whose weights are asked for take the
    explicit path and keep their weights; the others go the way a forward without maps goes (fused
    SDPA for softmax without competition, the explicit path without keeping weights otherwise).
    Heads never mix, so each head's output is the same whichever group it is in.
    """

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)
        self.attend = attention_function(cfg)
        self.compete = cfg.compete
        # background queries per head (compete only), in the space of the projected queries
        self.sinks = nn.Parameter(torch.randn(cfg.heads, cfg.sinks, self.head_dim) * 0.02) if cfg.sinks else None
        self.fused = cfg.attention == "softmax" and not cfg.compete  # SDPA computes exactly softmax attention
        self.dropout = cfg.dropout

    def weights(self, logits: Tensor, k: Tensor, mask: Tensor, query_mask: Tensor, sel: slice | list[int],
                groups: int = 1) -> tuple[Tensor, Tensor | None]:
        """Logits (B, h, Nq, Nk) of heads `sel` -> (weights (B, h, Nq, Nk), each query's claimed share
        (B, h, Nq) with competition, else None); `k` (B, h, Nk, hd) feeds the sinks; `groups`: how many
        independent query sets share each item's keys (they compete separately)."""
        if not self.compete:
            return self.attend(logits, mask), None
        sink_logits = None if self.sinks is None else (self.sinks[sel] / math.sqrt(self.head_dim)) @ k.transpose(-2, -1)
        return competitive_attention(logits, mask, query_mask, sink_logits=sink_logits, groups=groups, claimed=True)

    def attend_heads(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, query_mask: Tensor, sel: slice | list[int],
                     keep: bool, groups: int = 1) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Heads `sel` of q (B, H, Nq, hd), k/v (B, H, Nk, hd) -> output (B, h, Nq, hd), and if `keep` the
        weights and (with competition) each query's claimed share (B, h, Nq); `groups` query sets of
        Nq / groups each ask each item's keys."""
        p = self.dropout if self.training else 0.0
        if self.fused and not keep:
            o = F.scaled_dot_product_attention(q[:, sel], k[:, sel], v[:, sel], attn_mask=mask, dropout_p=p)
            return o, None, None
        scale = math.sqrt(self.head_dim)
        if torch.is_grad_enabled():  # explicit, differentiable (gradient relevance, importance)
            ks = k[:, sel]  # (B, h, Nk, hd)
            w, c = self.weights((q[:, sel] / scale) @ ks.transpose(-2, -1), ks, mask, query_mask, sel, groups)
            o = F.dropout(w, p, self.training) @ v[:, sel]  # (B, h, Nq, hd)
            return (o, w, c) if keep else (o, None, None)
        B, Nq, Nk = q.shape[0], q.shape[2], k.shape[2]
        heads = range(self.heads)[sel] if isinstance(sel, slice) else sel
        o = q.new_empty(B, len(heads), Nq, self.head_dim)  # (B, h, Nq, hd)
        if self.fused:  # softmax, kept: the logits are written where the weights go and normalised in place
            w = q.new_empty(B, len(heads), Nq, Nk)  # (B, h, Nq, Nk), the only tensor of that size
            # few, large ops: one per item or one per head, whichever is fewer (k and v stay views)
            cuts = ([((slice(None), j), (slice(None), h)) for j, h in enumerate(heads)] if len(heads) < B
                    else [((i,), (i, sel)) for i in range(B)])  # (where in w and o, which of q, k, v)
            for at, of in cuts:
                torch.matmul(q[of] / scale, k[of].transpose(-2, -1), out=w[at])  # (..., Nq, Nk)
            if not bool(mask.all()):
                w.masked_fill_(~mask, float("-inf"))
            torch.softmax(w, -1, out=w)
            for at, of in cuts:
                torch.matmul(F.dropout(w[at], p, self.training), v[of], out=o[at])  # (..., Nq, hd)
            return o, w, None
        # the other kinds, one item at a time: per-item logits and sorts stay small; only kept weights are allocated
        w = q.new_empty(B, len(heads), Nq, Nk) if keep else None  # (B, h, Nq, Nk)
        c = q.new_empty(B, len(heads), Nq) if keep and self.compete else None  # (B, h, Nq)
        for i in range(B):
            ki = k[i:i + 1, sel]  # (1, h, Nk, hd)
            wi, ci = self.weights((q[i:i + 1, sel] / scale) @ ki.transpose(-2, -1), ki, mask[i:i + 1],
                                  query_mask[i:i + 1], sel, groups)  # (1, h, Nq, Nk), (1, h, Nq)
            if keep:
                w[i] = wi[0]
                if c is not None:
                    c[i] = ci[0]
            torch.matmul(F.dropout(wi[0], p, self.training), v[i, sel], out=o[i])  # (h, Nq, hd)
        return o, w, c

    def forward(self, x: Tensor, kv: Tensor, key_mask: Tensor, head_mask: Tensor | None = None,
                need_weights: bool = False, query_mask: Tensor | None = None,
                heads: Sequence[int] | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(output, weights, claimed): `need_weights` returns the weights (Bq, h, Nq, Nk) of `heads`, in that
        order (None: all H heads), and with competition each query's claimed share of the keys (Bq, h, Nq).

        x (Bq, Nq, D) may hold G = Bq / B query items per key item of kv (B, Nk, D), in a row (query
        item i asks key item i // G): the keys are projected once and each key item's G query sets
        are attended as one longer set (G * Nq queries), which gives every row what G copies of the
        keys would (competition stays within each set).
        """
        Bq, Nq, D = x.shape
        B, Nk = kv.shape[:2]
        G = Bq // B
        H, hd = self.heads, self.head_dim
        q = self.q(x).view(B, G * Nq, H, hd).transpose(1, 2)  # (B, H, G*Nq, hd)
        k, v = self.kv(kv).view(B, Nk, 2, H, hd).permute(2, 0, 3, 1, 4)  # 2 x (B, H, Nk, hd)
        mask = key_mask[:, None, None, :]  # (B, 1, 1, Nk), True = attend
        qm = torch.ones(Bq, Nq, dtype=torch.bool, device=x.device) if query_mask is None else query_mask
        qm = qm.reshape(B, G * Nq)[:, None, :, None]  # (B, 1, G*Nq, 1), True = a real query (compete only)
        asked = (list(range(H)) if heads is None else list(heads)) if need_weights else []
        kept = list(dict.fromkeys(asked))  # in the order asked: no reordering copy
        groups = [(run, False) for run in head_runs([h for h in range(H) if h not in kept])]
        if kept:  # one group: a view of the heads when they are an ascending run
            runs = head_runs(kept)
            groups.append((runs[0] if len(runs) == 1 else kept, True))
        if len(groups) == 1:  # every head on one path
            o, w, c = self.attend_heads(q, k, v, mask, qm, *groups[0], G)
        else:
            o, w, c = q.new_empty(B, H, G * Nq, hd), None, None  # (B, H, G*Nq, hd), filled group by group
            for sel, keep in groups:
                o[:, sel], wg, cg = self.attend_heads(q, k, v, mask, qm, sel, keep, G)
                w, c = (wg, cg) if keep else (w, c)
        if need_weights and not kept:
            w, c = q.new_empty(Bq, 0, Nq, Nk), (q.new_empty(Bq, 0, Nq) if self.compete else None)
        elif need_weights and (asked != kept or (len(kept) < H and torch.is_grad_enabled())):
            # a subset comes back cut out, a copy (heads asked twice, twice), as it did when cut from all heads:
            # no output depends on it, so gradient relevance, whose rule averages every head, refuses it
            order = [kept.index(h) for h in asked]
            w, c = w[:, order], (None if c is None else c[:, order])  # (B, h, G*Nq, Nk), (B, h, G*Nq)
        if need_weights and G > 1:  # back to one row of maps per query item
            w = w.view(B, w.shape[1], G, Nq, Nk).transpose(1, 2).reshape(Bq, w.shape[1], Nq, Nk)
            c = None if c is None else c.view(B, c.shape[1], G, Nq).transpose(1, 2).reshape(Bq, c.shape[1], Nq)
        if head_mask is not None:
            o = o * head_mask.to(o.dtype).view(1, H, 1, 1)  # a masked head contributes exactly 0
        o = o.transpose(1, 2).reshape(Bq, Nq, D)  # (Bq, Nq, D)
        return self.out(o), w, c


class QuerySelfAttention(nn.Module):
    """Queries attend to each other (padded queries masked out); always the fused SDPA path."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, query_mask: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, hd)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=query_mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, N, hd)
        return self.out(o.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class FeedForward(nn.Sequential):
    def __init__(self, cfg: FusionConfig):
        super().__init__(nn.Linear(cfg.dim, cfg.ffn_mult * cfg.dim), nn.GELU(),
                         nn.Dropout(cfg.dropout), nn.Linear(cfg.ffn_mult * cfg.dim, cfg.dim))


class FusionLayer(nn.Module):
    """Pre-norm [query self-attention], cross-attention, then feed-forward, each with a residual."""

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.norm_sa = nn.LayerNorm(cfg.dim) if cfg.query_self_attention else None
        self.self_attn = QuerySelfAttention(cfg) if cfg.query_self_attention else None
        self.norm_q, self.norm_kv = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = CrossAttention(cfg)
        self.norm_ff = nn.LayerNorm(cfg.dim)
        self.ffn = FeedForward(cfg)

    def forward(self, x, kv, key_mask, query_mask, head_mask=None, need_weights=False, heads=None):
        if self.self_attn is not None:
            x = x + self.self_attn(self.norm_sa(x), query_mask)
        a, w, c = self.attn(self.norm_q(x), self.norm_kv(kv), key_mask, head_mask, need_weights, query_mask, heads)
        x = x + a
        x = x + self.ffn(self.norm_ff(x))
        return x, w, a, c


def sinusoidal(n: int, dim: int, device=None) -> Tensor:
    """(n, dim) fixed sinusoidal position codes (Vaswani et al.)."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(1e4) / dim))
    pe = torch.zeros(n, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe


@dataclass
class FusionOutput:
    queries: Tensor  # (B, Nq, D) fused queries after the final norm
    query_mask: Tensor  # (B, Nq) bool
    pooled: Tensor  # (B, D) mean over valid queries
    maps: AttentionMaps | None = None
    query_inputs: Tensor | None = None  # (B, Nq, D) the queries as they entered the first layer
    attended: Tensor | None = None  # (B, Nq, D) what the cross-attention brought in, summed over layers


class CrossAttentionFusion(nn.Module):
    """Queries (latents or one modality's tokens) attend over the other modalities' tokens."""

    def __init__(self, cfg: FusionConfig = FusionConfig()):
        super().__init__()
        self.cfg = cfg
        self.input_proj = nn.ModuleDict({
            m: nn.Linear(cfg.input_dim(m), cfg.dim) if cfg.input_dim(m) != cfg.dim else nn.Identity()
            for m in MODALITIES})
        self.modality_embed = nn.ParameterDict(
            {m: nn.Parameter(torch.randn(cfg.dim) * 0.02) for m in MODALITIES}
        ) if cfg.modality_embeddings else None
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, cfg.dim) * 0.02) if cfg.query == "latents" else None
        self.layers = nn.ModuleList(FusionLayer(cfg) for _ in range(cfg.layers))
        self.norm_out = nn.LayerNorm(cfg.dim)

    def _embed(self, t: ModalityTokens) -> Tensor:
        """Project one modality's tokens to the block width and add modality/position codes."""
        if t.dim != self.cfg.input_dim(t.modality):
            raise InputError(
                f"{t.modality} tokens are {t.dim} wide but this fusion block expects "
                f"{self.cfg.input_dim(t.modality)} (FusionConfig.input_dims['{t.modality}']); "
                f"set input_dims={{'{t.modality}': {t.dim}}} or use an encoder of that width")
        x = self.input_proj[t.modality](t.tokens)  # (B, N, D)
        if self.modality_embed is not None:
            x = x + self.modality_embed[t.modality]
        if self.cfg.positional:
            x = x + sinusoidal(x.shape[1], self.cfg.dim, x.device).to(x.dtype)
        return x

    def forward(self, inputs: Sequence[ModalityTokens] | Mapping[str, ModalityTokens],
                head_mask: Tensor | None = None,
                return_maps: bool | MapRequest = False) -> FusionOutput:
        """Fuse. `head_mask` is (layers, heads), 1 keeps a head and 0 removes it.

        `return_maps=True` (or a `MapRequest` naming layers/heads) returns `AttentionMaps`;
        layers and heads nobody asked for run as without maps (fused SDPA where exact) and store nothing.
        The query modality may have G times the key modalities' batch (G captions per scene, in a row):
        the keys are then embedded and projected once per scene, not once per caption, and every output
        (maps included, one row per query item) equals fusing G copies of each scene.
        """
        cfg = self.cfg
        given = {t.modality: t for t in (inputs.values() if isinstance(inputs, Mapping) else inputs)}
        if cfg.query == "latents":
            key_mods = [m for m in MODALITIES if m in given]
        else:
            if cfg.query not in given:
                raise InputError(f"this fusion block asks with {cfg.query} tokens: give a {cfg.query} input")
            key_mods = [m for m in MODALITIES if m in given and m != cfg.query]
        if not key_mods:
            raise InputError(f"nothing to attend to: give at least one input besides the {cfg.query} queries")
        B = given[key_mods[0]].tokens.shape[0]
        if any(given[m].tokens.shape[0] != B for m in key_mods):
            raise InputError("all key modalities must have the same batch size")
        Bq = B if cfg.query == "latents" else given[cfg.query].tokens.shape[0]
        if Bq % B:
            raise InputError(f"the {cfg.query} queries' batch ({Bq}) must be the keys' batch ({B}) or a multiple of "
                             "it (G query items per key item, in a row)")
        if head_mask is not None and tuple(head_mask.shape) != (cfg.layers, cfg.heads):
            raise InputError(f"head_mask must be (layers, heads) = ({cfg.layers}, {cfg.heads}), "
                             f"got {tuple(head_mask.shape)}")

        kv = torch.cat([self._embed(given[m]) for m in key_mods], dim=1)  # (B, Nk, D)
        key_mask = torch.cat([given[m].mask for m in key_mods], dim=1)  # (B, Nk)
        if not key_mask.any(-1).all():
            raise InputError("an item has no real key tokens (all padding): check the inputs")
        segments, start = {}, 0
        for m in key_mods:
            n = given[m].tokens.shape[1]
            segments[m], start = (start, start + n), start + n

        if cfg.query == "latents":
            x = self.latents.expand(B, -1, -1)  # (B, Nq, D)
            query_mask = torch.ones(B, cfg.num_latents, dtype=torch.bool, device=x.device)
            query_geometry, query_special = None, torch.zeros_like(query_mask)
        else:
            x = self._embed(given[cfg.query])  # (B, Nq, D)
            q_tokens = given[cfg.query]
            query_mask, query_geometry, query_special = q_tokens.mask, q_tokens.geometry, q_tokens.special
        query_inputs = x

        request = MapRequest() if return_maps is True else (return_maps or None)
        want_layers = set(range(cfg.layers)) if request is None or request.layers is None else set(request.layers)
        want_heads = list(range(cfg.heads)) if request is None or request.heads is None else list(request.heads)
        if request is not None and (not want_layers <= set(range(cfg.layers))
                                    or not set(want_heads) <= set(range(cfg.heads))):
            raise InputError(f"map request {request} is outside layers 0..{cfg.layers - 1} / heads 0..{cfg.heads - 1}")

        weights: dict[int, Tensor] = {}
        claimed: dict[int, Tensor] = {}
        attended = torch.zeros_like(x)
        for l, layer in enumerate(self.layers):
            need = request is not None and l in want_layers
            x, w, a, c = layer(x, kv, key_mask, query_mask, None if head_mask is None else head_mask[l], need,
                               want_heads)
            attended = attended + a
            if need:
                weights[l] = w  # (B, h, Nq, Nk), only the wanted heads were computed
                if c is not None:
                    claimed[l] = c  # (B, h, Nq)
        x = self.norm_out(x)
        qm = query_mask.to(x.dtype)[..., None]  # (B, Nq, 1)
        pooled = (x * qm).sum(1) / qm.sum(1).clamp_min(1)  # (B, D)

        maps = None
        if request is not None:
            key_special = torch.cat([given[m].special for m in key_mods], 1)  # (B, Nk)
            if Bq != B:  # one row per query item, as the maps have
                key_mask, key_special = key_mask.repeat_interleave(Bq // B, 0), key_special.repeat_interleave(Bq // B, 0)
            maps = AttentionMaps(
                weights=weights, heads={l: want_heads for l in weights}, segments=segments,
                key_mask=key_mask, key_special=key_special,
                query_source=cfg.query, query_mask=query_mask,
                key_geometry={m: given[m].geometry for m in key_mods},
                query_geometry=query_geometry, num_heads=cfg.heads, query_special=query_special,
                claimed=claimed or None)
        return FusionOutput(queries=x, query_mask=query_mask, pooled=pooled, maps=maps, query_inputs=query_inputs,
                            attended=attended)
