"""Head importance (docs/metrics.md section 3): ablation, gradient (Michel et al.), Shapley values.

Every method talks to the model through a callable that takes a `head_mask (L, H)` float
tensor (1 keeps a head, 0 removes it; the fusion block multiplies each head's output by
it before the output projection), so these functions never see a model:

    def value_fn(head_mask):                      # task metric, higher is better
        with torch.no_grad():
            return accuracy(model.fuse(tokens, head_mask=head_mask).score, labels)

    def loss_fn(head_mask, i):                    # ONE example's loss, with its graph
        return F.binary_cross_entropy_with_logits(model.fuse(tok[i], head_mask=head_mask).score, y[i])

Only zero-ablation is offered: a head_mask can remove a head's output but not replace it
with its mean over a data set (mean-ablation would need the per-head outputs before the
output projection, which the block does not expose). Record results as "zero-ablation".
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import Tensor

from multimodal.types import InputError

ValueFn = Callable[[Tensor], Any]  # head_mask (L, H) -> float (or 0-d tensor), higher = better
LossFn = Callable[[Tensor, Any], Tensor]  # (head_mask (L, H) with grad, example) -> scalar loss
ABLATION_MODES = ("zero",)
MAX_EXACT_PLAYERS = 16  # exact Shapley evaluates all 2^n coalitions


def _value(value_fn: ValueFn, mask: Tensor) -> float:
    with torch.no_grad():
        return float(value_fn(mask.clone()))


# ---------------------------------------------------------------------------------------
# Ablation
# ---------------------------------------------------------------------------------------


def ablation_importance(value_fn: ValueFn, layers: int, heads: int, mode: str = "zero",
                        device: torch.device | str = "cpu") -> Tensor:
    """`(L, H)` float64 `delta[l, h] = v(all heads) - v(all but head (l, h))`, zero-ablation.

    Positive: removing the head hurts the metric. 1 + L*H evaluations, under `no_grad`.
    """
    if mode not in ABLATION_MODES:
        raise InputError(f"mode={mode!r}: only zero-ablation ({ABLATION_MODES}) can be done with a head_mask")
    full = torch.ones(layers, heads, device=device)
    v_all = _value(value_fn, full)
    delta = torch.zeros(layers, heads, dtype=torch.float64)
    for l, h in itertools.product(range(layers), range(heads)):
        mask = full.clone()
        mask[l, h] = 0
        delta[l, h] = v_all - _value(value_fn, mask)
    return delta


# ---------------------------------------------------------------------------------------
# Gradient (Michel et al. 2019)
# ---------------------------------------------------------------------------------------


class GradientImportance(NamedTuple):
    raw: Tensor  # (L, H) float64, E_x |dL/dxi_h| over examples
    normalised: Tensor  # (L, H) per-layer L2 normalisation, then global min-max (run_bertology)


def normalise_importance(importance: Tensor, exponent: float = 2.0) -> Tensor:
    """run_bertology's post-processing: divide each layer by its L_p norm, then min-max over all heads.

    All-equal importances (max == min) come back as zeros instead of NaN.
    """
    norm = importance.pow(exponent).sum(-1).pow(1 / exponent)  # (L,)
    x = importance / (norm[:, None] + 1e-20)  # (L, H)
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def gradient_importance(loss_fn: LossFn, layers: int, heads: int, per_example_batches: int | Iterable,
                        device: torch.device | str = "cpu") -> GradientImportance:
    """Michel et al.'s head importance `I_h = E_x |dL(x)/dxi_h|`, gates `xi = ones(L, H)`.

    `per_example_batches` is either a count n (then `loss_fn(head_mask, i)` for i in
    range(n)) or an iterable of examples (then `loss_fn(head_mask, example)`). Each call
    must give ONE example's scalar loss: the absolute value is taken per example and then
    averaged (taking |.| of a batch-summed gradient computes |E| instead of E|.|, and
    opposite-signed examples cancel). Returns raw and normalised importances.
    """
    examples = range(per_example_batches) if isinstance(per_example_batches, int) else per_example_batches
    total = torch.zeros(layers, heads, dtype=torch.float64)
    count = 0
    for example in examples:
        gate = torch.ones(layers, heads, device=device, requires_grad=True)
        with torch.enable_grad():
            loss = loss_fn(gate, example)
            if loss.numel() != 1:
                raise InputError(f"loss_fn must return one example's scalar loss, got shape {tuple(loss.shape)}")
            (grad,) = torch.autograd.grad(loss.reshape(()), gate, allow_unused=True)
        if grad is not None:
            total += grad.detach().abs().double().cpu()
        count += 1
    if count == 0:
        raise InputError("gradient_importance needs at least one example")
    raw = total / count
    return GradientImportance(raw, normalise_importance(raw))


# ---------------------------------------------------------------------------------------
# Shapley values
# ---------------------------------------------------------------------------------------


class ShapleyImportance(NamedTuple):
    phi: Tensor  # (L, H) float64 Shapley value of each head
    stderr: Tensor  # (L, H) standard error of the estimate (0 when exact, NaN with one permutation)


def shapley_importance(value_fn: ValueFn, layers: int, heads: int, permutations: int = 100, seed: int = 0,
                       truncate: bool = False, tolerance: float = 0.01, exact: bool = False,
                       device: torch.device | str = "cpu") -> ShapleyImportance:
    """Shapley value of every head, the n = L*H heads being the players and `value_fn` the game.

    `phi_h = sum_{S not containing h} |S|!(n-|S|-1)!/n! [v(S + h) - v(S)]`.

    Monte Carlo (default): for each of `permutations` (M) random orders, start from the
    empty coalition (every head masked) and add heads one at a time, recording each
    head's marginal contribution `v(S + h) - v(S)`; `phi` is the mean over permutations and
    `stderr = std / sqrt(M)`. Each permutation's contributions telescope to
    `v(all) - v(none)`, so `phi.sum()` equals it (efficiency) up to rounding. Cost at most
    M*n + 1 evaluations: the values of coalitions already seen are cached (the game must
    be deterministic; `value_fn` runs under `no_grad`).

    `truncate=True` is truncated Monte Carlo (Ghorbani & Zou 2019): once `|v(all) - v(S)|
    <= tolerance * |v(all) - v(none)|` the remaining heads of that permutation get 0
    without being evaluated; efficiency then holds only within that tolerance.

    `exact=True` (n <= 16) evaluates the formula over all 2^n coalitions, which equals the
    average over all n! permutations; `stderr` is then 0.
    """
    n = layers * heads
    cache: dict[int, float] = {}

    def v(key: int, mask: Tensor) -> float:
        if key not in cache:
            cache[key] = _value(value_fn, mask.view(layers, heads))
        return cache[key]

    if exact:
        return _exact_shapley(v, layers, heads, device)
    if permutations < 1:
        raise InputError(f"permutations={permutations}: need at least one")
    v_none = v(0, torch.zeros(n, device=device))
    v_all = v((1 << n) - 1, torch.ones(n, device=device))
    close_enough = tolerance * abs(v_all - v_none)
    gen = torch.Generator().manual_seed(seed)
    contrib = torch.zeros(permutations, n, dtype=torch.float64)  # (M, n) marginal contributions
    for m in range(permutations):
        mask, key, prev = torch.zeros(n, device=device), 0, v_none
        for p in torch.randperm(n, generator=gen).tolist():
            if truncate and abs(v_all - prev) <= close_enough:
                break  # the rest of this permutation contributes 0
            mask[p], key = 1.0, key | (1 << p)
            cur = v(key, mask)
            contrib[m, p] = cur - prev
            prev = cur
    phi = contrib.mean(0)
    stderr = contrib.std(0) / math.sqrt(permutations) if permutations > 1 else torch.full((n,), math.nan,
                                                                                          dtype=torch.float64)
    return ShapleyImportance(phi.view(layers, heads), stderr.view(layers, heads))


def _exact_shapley(v: Callable[[int, Tensor], float], layers: int, heads: int, device) -> ShapleyImportance:
    n = layers * heads
    if n > MAX_EXACT_PLAYERS:
        raise InputError(f"exact Shapley over {n} heads needs 2^{n} evaluations; use exact=False "
                         f"(Monte Carlo) above {MAX_EXACT_PLAYERS} heads")
    keys = torch.arange(1 << n)  # (2^n,) coalition bitmasks
    bits = (keys[:, None] >> torch.arange(n)) & 1  # (2^n, n)
    values = torch.tensor([v(k, bits[k].to(device=device, dtype=torch.float32)) for k in range(1 << n)],
                          dtype=torch.float64)  # (2^n,)
    size = bits.sum(1)  # (2^n,)
    weight = torch.tensor([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) if s < n else 0.0
                           for s in range(n + 1)], dtype=torch.float64)  # (n+1,)
    phi = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        without = keys[bits[:, i] == 0]  # (2^(n-1),) coalitions not containing i
        phi[i] = (weight[size[without]] * (values[without | (1 << i)] - values[without])).sum()
    return ShapleyImportance(phi.view(layers, heads), torch.zeros(layers, heads, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# Side by side
# ---------------------------------------------------------------------------------------


def importance_table(ablation: Tensor | None = None, gradient: GradientImportance | Tensor | None = None,
                     shapley: ShapleyImportance | None = None) -> list[dict]:
    """One row per (layer, head) with whichever of the three importances are given, plus
    each method's rank of the head (1 = most important)."""
    cols: dict[str, Tensor] = {}
    if ablation is not None:
        cols["ablation"] = ablation
    if isinstance(gradient, GradientImportance):
        cols["gradient"], cols["gradient_normalised"] = gradient.raw, gradient.normalised
    elif gradient is not None:
        cols["gradient"] = gradient
    if shapley is not None:
        cols["shapley"], cols["shapley_stderr"] = shapley.phi, shapley.stderr
    if not cols:
        raise InputError("importance_table needs at least one of ablation, gradient, shapley")
    shape = next(iter(cols.values())).shape
    if any(c.shape != shape for c in cols.values()):
        raise InputError(f"importances must all be (layers, heads); got {[tuple(c.shape) for c in cols.values()]}")
    ranks = {}
    for name in ("ablation", "gradient", "shapley"):
        if name in cols:
            order = cols[name].flatten().argsort(descending=True, stable=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(1, order.numel() + 1)
            ranks[f"{name}_rank"] = rank.view(shape)
    L, H = shape
    return [{"layer": l, "head": h, **{k: float(c[l, h]) for k, c in cols.items()},
             **{k: int(r[l, h]) for k, r in ranks.items()}}
            for l, h in itertools.product(range(L), range(H))]
