"""benchmarks/audio_spill.py: how one event phrase's audio map is split into inside / edge / others / rest."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "audio_spill", Path(__file__).resolve().parents[1] / "benchmarks" / "audio_spill.py")
audio_spill = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(audio_spill)
COL = {c: i for i, c in enumerate(audio_spill.COLUMNS)}

TIMES = torch.arange(30) * 0.1 + 0.05  # column centres 0.05 .. 2.95 s, 0.1 s apart
EVENT = (1.0, 1.4)  # columns 10-13 have their centre inside
OTHER = (2.0, 2.3)  # columns 20-22


def split(mass_at: dict[int, float], valid: torch.Tensor | None = None):
    m = torch.zeros(1, len(TIMES))
    for col, v in mass_at.items():
        m[0, col] = v
    valid = torch.ones(len(TIMES), dtype=torch.bool) if valid is None else valid
    return audio_spill.phrase_rows(m, TIMES, valid, EVENT, [OTHER])[0]


def test_a_map_inside_the_event_scores_its_whole_mass_inside_and_a_strict_hit():
    row = split({10: 1.0, 11: 2.0, 13: 1.0})
    assert row[COL["inside"]] == pytest.approx(1.0)
    assert row[[COL[p] for p in audio_spill.PARTS[1:]]].sum() == pytest.approx(0.0)
    assert row[COL["gain"]] == pytest.approx(30 / 4)  # 4 of 30 columns inside: uniform scores 1
    assert (row[COL["strict"]], row[COL["edge peak"]]) == (1.0, 0.0)


def test_mass_beside_the_event_is_edge_not_inside_and_its_peak_is_an_edge_peak():
    row = split({9: 3.0, 14: 1.0, 8: 1.0, 16: 1.0})  # 9, 14: one column out; 8: two; 16: three (rest)
    assert row[COL["inside"]] == pytest.approx(0.0)
    assert row[COL["edge 1"]] == pytest.approx(4 / 6)
    assert row[COL["edge 2"]] == pytest.approx(1 / 6)
    assert row[COL["rest"]] == pytest.approx(1 / 6)
    assert (row[COL["strict"]], row[COL["edge peak"]]) == (0.0, 1.0)


def test_mass_on_another_event_counts_as_others_and_padding_gets_none():
    valid = torch.ones(len(TIMES), dtype=torch.bool)
    valid[25:] = False  # padded columns: the map's mass there is dropped before renormalising
    row = split({21: 1.0, 11: 1.0, 27: 5.0}, valid)
    assert row[COL["others"]] == pytest.approx(0.5)
    assert row[COL["inside"]] == pytest.approx(0.5)
    assert row[COL["gain"]] == pytest.approx(0.5 * 25 / 4)
    assert sum(row[COL[p]] for p in audio_spill.PARTS) == pytest.approx(1.0)
