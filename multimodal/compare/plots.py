"""The report's PNG plots, drawn with matplotlib's object API (no pyplot: no global figure state,
the Agg canvas by default): per-run layers x heads heatmaps, every metric per grid point,
grounding against model size, metrics over the training snapshots, and attention kinds side by
side. Each function returns the file it wrote, or None when the runs give it nothing to draw.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from multimodal.compare.summary import (DYNAMICS, HEATMAPS, METRICS, SIZE_METRICS, Group, mean_std,
                                        pointing_best_strict, sizes_differ, snapshot_series, value)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_heads(run: dict, path: Path) -> Path:
    """Layers x heads heatmaps of one run's per-head metrics."""
    heads = run["heads"]
    L = 1 + max(r["layer"] for r in heads)
    H = 1 + max(r["head"] for r in heads)
    panels = [(k, t) for k, t, _ in HEATMAPS if any(r.get(k) is not None for r in heads)]
    fig = Figure(figsize=((1.2 + 0.5 * H) * len(panels), 1.3 + 0.5 * L), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (key, title) in zip(axes, panels):
        grid = np.full((L, H), np.nan)
        for r in heads:
            if r.get(key) is not None:
                grid[r["layer"], r["head"]] = r[key]
        cmap = "RdBu_r" if key == "shapley" else "viridis"
        lim = np.nanmax(np.abs(grid)) if key == "shapley" and np.isfinite(grid).any() else None
        im = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=-lim if lim else None, vmax=lim)
        for l in range(L):
            for h in range(H):
                if np.isfinite(grid[l, h]):
                    shade = float(im.norm(grid[l, h]))
                    dark = shade < 0.6 if cmap == "viridis" else abs(shade - 0.5) > 0.3
                    ax.text(h, l, f"{grid[l, h]:.3g}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        ax.set_xlabel("head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
    fig.suptitle(run["run_id"], fontsize=9)
    return _save(fig, path)



def _short(label: str) -> str:
    return label.replace("fusion.", "").replace("scene.", "").replace(",", ", ")


def plot_summary(groups: list[Group], path: Path) -> Path | None:
    """Each metric per grid point: mean ± std bars, one dot per seed."""
    metrics = [(k, t) for k, t, _ in METRICS if any(v is not None for g in groups for v in g.values(k))]
    if not metrics:
        return None
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(3.2 * cols + 0.4 * len(groups), 2.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    x = np.arange(len(groups))
    for ax, (key, title) in zip(axes, metrics):
        means = [mean_std(g.values(key)) for g in groups]
        ax.bar(x, [m for m, _, _ in means], yerr=[0 if math.isnan(s) else s for _, s, _ in means],
               color="#8fb3d9", capsize=3)
        for i, g in enumerate(groups):
            vals = [v for v in g.values(key) if v is not None]
            ax.plot([i] * len(vals), vals, "k.", markersize=4)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels([_short(g.label) for g in groups], fontsize=7, rotation=30, ha="right")
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def plot_size(groups: list[Group], path: Path) -> Path | None:
    """Grounding and matching against fusion parameter count (log x)."""
    if not sizes_differ({g.fusion_params for g in groups}):
        return None
    metrics = [(k, t) for k, t, _ in METRICS if k in SIZE_METRICS[:3]
               and any(v is not None for g in groups for v in g.values(k))]
    fig = Figure(figsize=(4 * len(metrics), 3.3))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, (key, title) in zip(axes, metrics):
        for g in groups:
            vals = [v for v in g.values(key) if v is not None]
            if not vals:
                continue
            m, s, _ = mean_std(vals)
            ax.plot([g.fusion_params] * len(vals), vals, ".", color="0.6", markersize=4)
            ax.errorbar([g.fusion_params], [m], yerr=[0 if math.isnan(s) else s], fmt="o", capsize=3,
                        label=_short(g.label))
        ax.set_xscale("log")
        ax.set_xlabel("fusion parameters", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def plot_dynamics(groups: list[Group], path: Path) -> Path | None:
    """Metrics against training step (snapshots), mean ± std over seeds per grid point."""
    if not any(len(r.get("snapshots", [])) >= 2 for g in groups for r in g.runs):
        return None
    metrics = [(k, t) for k, t, _ in DYNAMICS
               if any(s["summary"].get(k) is not None for g in groups for r in g.runs for s in r["snapshots"])]
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (key, title) in zip(axes, metrics):
        for g in groups:
            by_step = snapshot_series(g.runs, key)
            steps = sorted(by_step)
            if not steps:
                continue
            m = np.array([np.mean(by_step[s]) for s in steps])
            sd = np.array([np.std(by_step[s], ddof=1) if len(by_step[s]) > 1 else 0.0 for s in steps])
            ax.plot(steps, m, "o-", label=_short(g.label), markersize=3)
            ax.fill_between(steps, m - sd, m + sd, alpha=0.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def plot_attention_kinds(results: list[dict], path: Path) -> Path | None:
    """Dense vs sparse: grounding, entropy and evaluation cost per attention kind (pooled over
    every other grid value and seed)."""
    kinds = list(dict.fromkeys(r["attention"] for r in results))
    if len(kinds) < 2:
        return None
    metrics = [(pointing_best_strict("image"), "best-head strict pointing (image)"),
               (pointing_best_strict("audio"), "best-head strict pointing (audio)"),
               ("entropy_mean", "mean normalised entropy"), ("eval_s", "evaluation seconds"),
               ("fusion_pass_s", "fusion pass seconds (analysis set)")]
    metrics = [(k, t) for k, t in metrics if any(value(r, k) is not None for r in results)]
    fig = Figure(figsize=(3.2 * len(metrics), 3.2))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    x = np.arange(len(kinds))
    for ax, (key, title) in zip(axes, metrics):
        stats = [mean_std([value(r, key) for r in results if r["attention"] == k]) for k in kinds]
        ax.bar(x, [m for m, _, _ in stats], yerr=[0 if math.isnan(s) else s for _, s, _ in stats],
               color="#d9a38f", capsize=3)
        for i, k in enumerate(kinds):
            vals = [value(r, key) for r in results if r["attention"] == k]
            vals = [v for v in vals if v is not None]
            ax.plot([i] * len(vals), vals, "k.", markersize=4)
        ax.set_xticks(x)
        ax.set_xticklabels(kinds, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return _save(fig, path)
