"""Scoring maps against ground truth (docs/metrics.md section 5). Pure functions over tensors.

Image maps are `(N, gh, gw)` over the patch grid, ground truth is `(N, H, W)` masks at
image resolution. Audio maps are `(N, T)` over time columns with centres `times (T,)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

POINTING_TOLERANCE_PX = 15  # TorchRay's pointing game


def upsample_map(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, gh, gw) -> (N, H, W), bilinear, non-negative."""
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)  # (N, 1, H, W)
    return up[:, 0].clamp_min(0)


def _dilate(masks: Tensor, radius: int) -> Tensor:
    """(N, H, W) bool -> pixels within `radius` px (Euclidean) of a mask pixel."""
    if radius <= 0:
        return masks.bool()
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).float()[None, None]  # (1, 1, k, k)
    hit = F.conv2d(masks[:, None].float(), disk, padding=radius)  # (N, 1, H, W)
    return hit[:, 0] > 0.5


def pointing_game(maps: Tensor, masks: Tensor, tolerance: int = POINTING_TOLERANCE_PX,
                  generator: torch.Generator | None = None) -> Tensor:
    """(N,) bool hits: the map's maximum at image resolution lies within `tolerance` px of the mask.

    Ties are broken at random (a uniform map does not "point" at the top-left corner).
    """
    up = upsample_map(maps, tuple(masks.shape[-2:]))  # (N, H, W)
    flat = up.flatten(1)  # (N, H*W)
    top = flat.amax(1, keepdim=True)
    ties = flat >= top - 1e-7 * top.abs().clamp_min(1e-12)  # (N, H*W)
    noise = torch.rand(flat.shape, generator=generator)
    idx = torch.where(ties, noise, torch.full_like(noise, -1.0)).argmax(1)  # (N,)
    near = _dilate(masks, tolerance).flatten(1)  # (N, H*W)
    return near.gather(1, idx[:, None])[:, 0]


def energy_inside(maps: Tensor, masks: Tensor) -> Tensor:
    """(N,) share of the (non-negative, upsampled) map's energy that falls inside the mask."""
    up = upsample_map(maps, tuple(masks.shape[-2:]))  # (N, H, W)
    total = up.flatten(1).sum(1)
    inside = (up * masks.float()).flatten(1).sum(1)
    return inside / total.clamp_min(1e-12)


def region_fraction(masks: Tensor) -> Tensor:
    """(N,) the uniform map's energy inside each mask = mask area / image area."""
    return masks.flatten(1).float().mean(1)


def interval_mass(maps: Tensor, times: Tensor, intervals: Tensor, valid: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """(mass, chance), each (N,): share of the map on time columns whose centre is in [t0, t1].

    `valid (N, T)` excludes padding columns before renormalising; chance = |I| / T_valid
    counted in columns, so `mass / chance` is the gain over a uniform map.
    """
    a = maps.float().clamp_min(0)
    if valid is None:
        valid = torch.ones_like(a, dtype=torch.bool)
    a = a * valid
    t = times.float()[None, :]  # (1, T)
    inside = (t >= intervals[:, :1]) & (t <= intervals[:, 1:2]) & valid  # (N, T)
    mass = (a * inside).sum(1) / a.sum(1).clamp_min(1e-12)
    chance = inside.sum(1).float() / valid.sum(1).clamp_min(1).float()
    return mass, chance


def temporal_pointing(maps: Tensor, times: Tensor, intervals: Tensor, tolerance: float,
                      valid: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """(N,) bool: the map's peak column centre lies in [t0 - tol, t1 + tol] (random tie-break)."""
    a = maps.float()
    if valid is not None:
        a = a.masked_fill(~valid, float("-inf"))
    top = a.amax(1, keepdim=True)
    ties = a >= top - 1e-7 * top.abs().clamp_min(1e-12)
    noise = torch.rand(a.shape, generator=generator)
    idx = torch.where(ties, noise, torch.full_like(noise, -1.0)).argmax(1)  # (N,)
    peak = times.float()[idx]
    return (peak >= intervals[:, 0] - tolerance) & (peak <= intervals[:, 1] + tolerance)
