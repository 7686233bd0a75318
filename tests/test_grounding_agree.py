"""The app's grounding figures and `multimodal eval`'s are one definition
(`multimodal.analysis.grounding.score_phrase`): same maps + same ground truth -> same numbers."""

import numpy as np
import pytest
import torch

import multimodal.app as A
from multimodal import evaluate as E
from multimodal import inference
from multimodal.analysis.grounding import TIME_TOLERANCE_COLUMNS, score_event
from multimodal.app.session import TIE_SEED, grounding_scores, metrics_rows
from multimodal.data.manifest import load_manifest, scene_to_manifest_row, write_manifest
from multimodal.data.scenes import generate_scene, save_scene
from multimodal.data.truth import GroundTruth, from_manifest_row, from_scene, load_ground_truth, load_scene_json
from multimodal.types import AttentionMaps, AudioGeometry, TextGeometry

COLUMNS = {("image", "pointing"): "pointing image", ("image", "energy"): "energy in object",
           ("audio", "pointing"): "pointing audio", ("audio", "energy"): "mass in event",
           ("image", "pointing_strict"): "pointing image, strict", ("audio", "pointing_strict"): "pointing audio, strict"}


def eval_scores(maps: AttentionMaps, layer: int, truth) -> dict[str, np.ndarray]:
    """evaluate.ground_batch on one item and one layer, tie-breaks seeded as the app seeds them."""
    tally = E.GroundingTally()
    E.ground_batch(tally, "model", {layer: E._modality_maps(maps, layer)}, [truth], maps,
                   torch.Generator().manual_seed(TIE_SEED))
    out = {}
    for (mod, metric), column in COLUMNS.items():
        heads = [k[3] for k in tally.rows if k[:3] == ("model", mod, layer) and k[4] == metric]
        if heads:
            out[column] = np.array([tally.mean(("model", mod, layer, h, metric)) for h in sorted(heads)])
    return out


@pytest.fixture(scope="module")
def sample():
    assert (inference.DEFAULT_CHECKPOINT / "config.json").is_file(), "the embedded default model is committed"
    model, source = inference.load_model()
    assert source == inference.DEFAULT_CHECKPOINT
    assets = inference.ASSETS
    inputs = inference.load_inputs(assets / "sample.png", assets / "sample.wav",
                                   (assets / "sample.txt").read_text(encoding="utf-8").strip(), A.APP_LIMITS)
    maps = inference.run(model, inputs).maps
    return model, inputs, maps


def test_app_and_eval_agree_on_the_bundled_sample(sample):
    model, inputs, maps = sample
    assert model.cfg.query == "text"
    app_truth = A.load_ground_truth(inference.ASSETS / "sample.json")  # the app's reader (finds the masks PNG)
    eval_truth = load_scene_json(inference.ASSETS / "sample.json")  # the scene JSON + its masks
    size = (inputs.image.height, inputs.image.width)
    assert app_truth.phrases == eval_truth.phrases and app_truth.events == eval_truth.events
    for a, b in zip(app_truth.object_masks(size), eval_truth.object_masks()):
        assert torch.equal(a, b)

    headers, rows = metrics_rows(maps, None, app_truth, size)
    assert {"pointing image", "energy in object", "mass in event", "pointing audio"} <= set(headers)
    by_head = {r[0]: dict(zip(headers, r)) for r in rows}
    for layer in maps.layers:
        app = grounding_scores(maps, layer, app_truth, size)
        ev = eval_scores(maps, layer, eval_truth)
        assert set(app) == set(ev) == set(COLUMNS.values()), (layer, set(app), set(ev))
        for column in COLUMNS.values():
            assert app[column].shape == (len(maps.heads[layer]),)
            np.testing.assert_allclose(app[column], ev[column], atol=1e-6, rtol=0, err_msg=f"L{layer} {column}")
            for i, h in enumerate(maps.heads[layer]):  # the page's table shows the same figures, rounded
                assert abs(by_head[f"L{layer} H{h}"][column] - ev[column][i]) <= 5e-4 + 1e-6


# -- the audio tolerance by hand: one column spacing, validity from the key mask -----------------

SPACING = 0.25  # s; column centres (j + 0.5) * SPACING are exact in binary


def audio_maps(row: list[float], pad_last: bool) -> AttentionMaps:
    """One item, one layer, two identical heads; text queries "[CLS] a beep [SEP]" over 8 time columns."""
    T = len(row)
    times = [(j + 0.5) * SPACING for j in range(T)]
    w = torch.zeros(1, 2, 4, T)
    w[0, :, :] = torch.tensor(row)
    key_mask = torch.ones(1, T, dtype=torch.bool)
    if pad_last:
        key_mask[0, -1] = False  # padding, although its centre lies before the duration below
    return AttentionMaps(
        weights={0: w}, heads={0: [0, 1]}, segments={"audio": (0, T)}, key_mask=key_mask,
        key_special=torch.zeros(1, T, dtype=torch.bool), query_source="text",
        query_mask=torch.ones(1, 4, dtype=torch.bool),
        key_geometry={"audio": AudioGeometry(times=times, freq_bins=1, sample_rate=16000, durations=[T * SPACING])},
        query_geometry=TextGeometry(["a beep"], [["[CLS]", "a", "beep", "[SEP]"]], [[(0, 0), (0, 1), (2, 6), (0, 0)]]),
        num_heads=2, query_special=torch.tensor([[True, False, False, True]]))


def truth(start: float, end: float) -> GroundTruth:
    return GroundTruth([{"span": (0, 6), "target": "event", "index": 0}], [], [(start, end)], "a beep")


ROW = [0.05, 0.10, 0.15, 0.40, 0.10, 0.10, 0.05, 0.05]  # peak on column 3, centre 0.875 s


@pytest.mark.parametrize("end, hit", [(0.625, True),  # peak exactly one column past the end: a hit
                                      (0.5, False)])  # 1.5 columns past the end: a miss
def test_audio_tolerance_is_one_column(end, hit):
    assert TIME_TOLERANCE_COLUMNS == 1.0
    maps = audio_maps(ROW, pad_last=False)
    gt = truth(0.375, end)
    app = grounding_scores(maps, 0, gt, None)
    ev = eval_scores(maps, 0, gt)
    assert app["pointing audio"].tolist() == [float(hit)] * 2
    np.testing.assert_array_equal(ev["pointing audio"], app["pointing audio"])
    times = torch.tensor(maps.key_geometry["audio"].times)
    m = torch.tensor([ROW])
    assert bool(score_event(m, times, (0.375, end))["pointing"][0]) == hit
    # the app's former rule (half a column) missed the first case too
    assert not bool(score_event(m, times, (0.375, end), tolerance_columns=0.5)["pointing"][0])


def test_audio_mass_uses_the_key_mask_for_validity():
    maps = audio_maps(ROW, pad_last=True)  # column 7 is padding by the key mask
    gt = truth(0.375, 0.625)  # columns 1 and 2 (centres 0.375 and 0.625)
    app = grounding_scores(maps, 0, gt, None)
    ev = eval_scores(maps, 0, gt)
    mass = (0.10 + 0.15) / (1.0 - 0.05)  # renormalised over the 7 valid columns
    np.testing.assert_allclose(app["mass in event"], [mass, mass], atol=1e-6)
    np.testing.assert_allclose(ev["mass in event"], app["mass in event"], atol=1e-6)
    tally = E.GroundingTally()
    E.ground_batch(tally, "m", {0: E._modality_maps(maps, 0)}, [gt], maps, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(tally.mean(("m", "audio", 0, 0, "energy_gain")), mass / (2 / 7), rtol=1e-5)


# -- one ground-truth reader -------------------------------------------------------------------


def test_readers_agree_on_a_scene(tmp_path):
    scene = generate_scene(5)
    paths = save_scene(scene, tmp_path / "s", "scene")
    direct = from_scene(scene)
    from_json = load_scene_json(paths["json"])
    uploaded = load_ground_truth(paths["json"])  # the app's reader: the masks PNG is beside the JSON
    assert direct.phrases == from_json.phrases == uploaded.phrases
    assert direct.events == from_json.events == uploaded.events
    assert direct.caption == from_json.caption == uploaded.caption == scene.caption
    assert direct.image_size == from_json.image_size == scene.image.shape[:2]
    for a, b, c, m in zip(direct.object_masks(), from_json.object_masks(), uploaded.object_masks(direct.image_size),
                          scene.masks):
        assert torch.equal(a, b) and torch.equal(a, c) and np.array_equal(a.numpy(), m)

    row = scene_to_manifest_row(scene, tmp_path / "m", "scene")
    rows, errors = load_manifest(write_manifest([row], tmp_path / "m" / "manifest.jsonl"), progress=False)
    assert not errors
    manifest = from_manifest_row(rows[0])
    assert manifest.phrases == direct.phrases and manifest.image_size == direct.image_size
    np.testing.assert_allclose(manifest.events, direct.events)
    for box_mask, o in zip(manifest.object_masks(), scene.objects):  # boxes rasterised at the image size
        x0, y0, x1, y1 = o["box"]
        assert int(box_mask.sum()) == (x1 - x0) * (y1 - y0)
