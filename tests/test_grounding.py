"""Grounding metrics against hand-computed cases."""

import torch

from multimodal.analysis.grounding import (energy_inside, interval_mass, pointing_game, region_fraction,
                                           temporal_pointing)


def square_mask(y0, y1, x0, x1, size=64):
    m = torch.zeros(1, size, size, dtype=torch.bool)
    m[0, y0:y1, x0:x1] = True
    return m


def test_pointing_hit_miss_and_tolerance():
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0] = 1.0  # peak in the top-left patch (pixels 0..15 of a 64 px image)
    assert pointing_game(maps, square_mask(0, 8, 0, 8)).item()
    # mask in the bottom-right corner: far more than 15 px away
    assert not pointing_game(maps, square_mask(56, 64, 56, 64)).item()
    # an interior peak at patch (1, 1): bilinear upsampling puts it on pixels {23, 24} x {23, 24};
    # a mask starting at row 38 is 14-15 px below it: a hit at 15 px tolerance, a miss at 10
    inner = torch.zeros(1, 4, 4)
    inner[0, 1, 1] = 1.0
    assert pointing_game(inner, square_mask(38, 42, 23, 25), tolerance=15).item()
    assert not pointing_game(inner, square_mask(38, 42, 23, 25), tolerance=10).item()


def test_uniform_map_points_at_random_not_top_left():
    maps = torch.ones(400, 4, 4)
    masks = square_mask(0, 16, 0, 16).expand(400, -1, -1)
    rate = pointing_game(maps, masks, tolerance=0, generator=torch.Generator().manual_seed(0)).float().mean()
    # chance = 256 / 4096 = 0.0625; the first-index argmax would score 1.0
    assert 0.02 < rate.item() < 0.12


def test_energy_inside_matches_area_for_uniform_and_one_for_concentrated():
    mask = square_mask(0, 32, 0, 32)
    assert abs(energy_inside(torch.ones(1, 4, 4), mask).item() - 0.25) < 1e-6
    assert abs(region_fraction(mask).item() - 0.25) < 1e-9
    peaked = torch.zeros(1, 8, 8)
    peaked[0, :4, :4] = 1.0
    e = energy_inside(peaked, mask).item()
    assert e > 0.9


def test_interval_mass_and_chance():
    times = torch.tensor([0.05, 0.15, 0.25, 0.35])
    maps = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    mass, chance = interval_mass(maps, times, torch.tensor([[0.1, 0.2]]))
    assert abs(mass.item() - 0.6) < 1e-6 and abs(chance.item() - 0.25) < 1e-6
    # padding columns are excluded before renormalising
    valid = torch.tensor([[True, True, True, False]])
    mass, chance = interval_mass(maps, times, torch.tensor([[0.1, 0.2]]), valid)
    assert abs(mass.item() - 0.6 / 0.9) < 1e-6 and abs(chance.item() - 1 / 3) < 1e-6


def test_temporal_pointing():
    times = torch.tensor([0.05, 0.15, 0.25, 0.35])
    maps = torch.tensor([[0.1, 0.1, 0.7, 0.1]])
    assert temporal_pointing(maps, times, torch.tensor([[0.2, 0.3]]), 0.0).item()
    assert not temporal_pointing(maps, times, torch.tensor([[0.0, 0.1]]), 0.1).item()
    assert temporal_pointing(maps, times, torch.tensor([[0.0, 0.1]]), 0.16).item()


def test_strict_and_tolerant_pointing_read_the_same_peak():
    """A peak one cell beside the object: a tolerant hit, a strict miss; on the object: both hit.
    An event peak one column after the event: tolerant hit, strict miss."""
    from multimodal.analysis.grounding import score_event, score_object

    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[16:32, 16:32] = True  # cell (1, 1) of a 4 x 4 grid of 16 px cells
    m = torch.zeros(2, 4, 4)
    m[0, 1, 1] = 1.0  # head 0 peaks on the object
    m[1, 1, 2] = 1.0  # head 1 one cell to the right (its upsampled peak is near x = 40, 8 px from the mask)
    s = score_object(m, mask, torch.Generator().manual_seed(0))
    assert s["pointing"].tolist() == [True, True] and s["pointing_strict"].tolist() == [True, False]
    times = torch.tensor([0.05, 0.15, 0.25, 0.35, 0.45])
    a = torch.zeros(2, 5)
    a[0, 2], a[1, 3] = 1.0, 1.0  # head 0 peaks at 0.25 s, head 1 at 0.35 s
    e = score_event(a, times, (0.2, 0.3), None, torch.Generator().manual_seed(0))
    assert e["pointing"].tolist() == [True, True] and e["pointing_strict"].tolist() == [True, False]
    assert e["energy"].tolist() == [1.0, 0.0]
