"""Per-head metrics: hand-computed cases (arithmetic in the comments) plus properties."""

import math

import numpy as np

import pytest
import torch

from multimodal.compare.summary import image_focus, image_led_fraction, modality_focus
from multimodal import AttentionMaps, AudioGeometry, CrossAttentionFusion, FusionConfig, ImageGeometry, ModalityTokens
from multimodal.analysis.metrics import (confidence, entropy, entropy_per_query, head_metric_table, uniform_modality_share,
                                         js_divergence_matrix, modality_share, redundancy_clusters,
                                         redundancy_summary, scaled_confidence, spatial_spread, temporal_spread)

LN2 = math.log(2)


def two_item_case():
    """B=2, H=2, Nq=2, Nk=4. Item 1 has 2 valid keys and 1 valid query (query 1 is padding)."""
    A = torch.zeros(2, 2, 2, 4)
    A[0, 0, 0] = torch.tensor([0.25, 0.25, 0.25, 0.25])
    A[0, 0, 1] = torch.tensor([1.0, 0, 0, 0])
    A[1, 0, 0] = torch.tensor([0.5, 0.5, 0, 0])
    A[1, 0, 1] = torch.tensor([0.9, 0.1, 0, 0])  # padded query: garbage that must be ignored
    A[:, 1, :, 0] = 1.0  # head 1 is one-hot everywhere
    key_mask = torch.tensor([[True] * 4, [True, True, False, False]])
    query_mask = torch.tensor([[True, True], [True, False]])
    return A, key_mask, query_mask


def test_entropy_hand_computed():
    A, km, qm = two_item_case()
    # head 0, normalised by ln N_b: item 0 = (ln4/ln4 + 0)/2 = 0.5; item 1 = ln2/ln2 = 1 -> (0.5 + 1)/2 = 0.75
    # head 1: one-hot rows -> 0
    torch.testing.assert_close(entropy(A, km, qm), torch.tensor([0.75, 0.0]))
    # unnormalised: item 0 = (ln4 + 0)/2 = ln2, item 1 = ln2 -> ln2
    torch.testing.assert_close(entropy(A, km, qm, normalise=False), torch.tensor([LN2, 0.0]))
    # smoothing over N_b keys: item 1's uniform row over its 2 keys stays uniform (it would not
    # with n = 4 padded keys); item 0's one-hot row -> [0.925, 0.025 x 3] with s = 0.1
    s = 0.1
    h_onehot = -(0.925 * math.log(0.925) + 3 * 0.025 * math.log(0.025)) / math.log(4)
    expected = ((1.0 + h_onehot) / 2 + 1.0) / 2
    assert entropy(A, km, qm, smoothing=s)[0].item() == pytest.approx(expected, rel=1e-5)


def test_entropy_single_key_is_zero_and_exact_zeros_are_fine():
    A = torch.tensor([[[[1.0, 0.0, 0.0]]]])  # (1, 1, 1, 3)
    km = torch.tensor([[True, False, False]])  # N_b = 1 -> ln N_b = 0 -> normalised entropy 0, not NaN
    qm = torch.tensor([[True]])
    assert entropy(A, km, qm).item() == 0.0
    # sparse rows with exact zeros: xlogy gives 0 for 0 ln 0; [0.5, 0.5, 0] over 3 keys -> ln2 / ln3
    B = torch.tensor([[[[0.5, 0.5, 0.0]]]])
    assert entropy(B, torch.ones(1, 3, dtype=torch.bool), qm).item() == pytest.approx(LN2 / math.log(3))
    assert entropy(B.half(), torch.ones(1, 3, dtype=torch.bool), qm).dtype == torch.float32


def test_entropy_decomposes_over_modalities():
    # docs/metrics.md section 1 [derived]: keys [img; aud]: H = H_bin(m_img) + m_img H_img + m_aud H_aud
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, 4, 7, generator=g).softmax(-1)  # img = keys 0..3, aud = 4..6
    km = torch.ones(2, 7, dtype=torch.bool)
    H = entropy_per_query(A, km, normalise=False)
    m_img, m_aud = A[..., :4].sum(-1), A[..., 4:].sum(-1)
    h_img = entropy_per_query(A[..., :4] / m_img[..., None], km[:, :4], normalise=False)
    h_aud = entropy_per_query(A[..., 4:] / m_aud[..., None], km[:, 4:], normalise=False)
    h_bin = -(m_img * m_img.log() + m_aud * m_aud.log())
    torch.testing.assert_close(H, h_bin + m_img * h_img + m_aud * h_aud)


def test_confidence_hand_computed():
    A, km, qm = two_item_case()
    # head 0: item 0 maxes 0.25, 1 -> 0.625; item 1 max 0.5 -> (0.625 + 0.5)/2 = 0.5625. Head 1: 1
    torch.testing.assert_close(confidence(A, km, qm), torch.tensor([0.5625, 1.0]))
    # scaled N_b * max: item 0 (4*0.25 + 4*1)/2 = 2.5, item 1 2*0.5 = 1 -> 1.75; head 1: (4 + 2)/2 = 3
    torch.testing.assert_close(scaled_confidence(A, km, qm), torch.tensor([1.75, 3.0]))


def test_uniform_rows_score_one_for_any_key_count():
    for n in (3, 50):
        A = torch.full((1, 1, 2, n), 1 / n)
        km, qm = torch.ones(1, n, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)
        assert entropy(A, km, qm).item() == pytest.approx(1.0)
        assert scaled_confidence(A, km, qm).item() == pytest.approx(1.0)


def test_spatial_spread_hand_computed():
    A = torch.zeros(1, 1, 4, 2, 2)  # (B, H, Nq, gh, gw), 16 px patches
    A[0, 0, 0, 0, 0] = A[0, 0, 0, 0, 1] = 0.5  # centroid (0, 8) px, each patch 8 px away -> 8
    A[0, 0, 1, 0, 0] = A[0, 0, 1, 1, 1] = 0.1  # 0.2 on the image (the rest elsewhere): renormalised to
    #   0.5 / 0.5, centroid (8, 8), each patch sqrt(8^2 + 8^2) = 11.3137 px away -> 11.3137
    # query 2: no image mass -> left out; query 3: padded (garbage) -> left out
    A[0, 0, 3, 1, 0] = 0.7
    A[0, 0, 3, 0, 1] = 0.3
    qm = torch.tensor([[True, True, True, False]])
    expected = (8 + math.sqrt(128)) / 2  # 9.6569
    assert spatial_spread(A, 16, qm).item() == pytest.approx(expected, rel=1e-6)
    # anisotropic patches (ph, pw) = (16, 8): query 0 -> 4 px; query 1 -> sqrt(8^2 + 4^2) = 8.944
    assert spatial_spread(A, (16, 8), qm).item() == pytest.approx((4 + math.sqrt(80)) / 2, rel=1e-6)


def test_temporal_spread_hand_computed():
    times = [0.1, 0.3, 0.5]
    A = torch.tensor([[[[0.5, 0.0, 0.5],  # centroid 0.3 s, spread 0.2 s
                        [0.0, 1.0, 0.0],  # 0 s
                        [0.9, 0.0, 0.1]]]])  # padded query
    qm = torch.tensor([[True, True, False]])
    assert temporal_spread(A, times, qm).item() == pytest.approx(0.1, rel=1e-6)  # (0.2 + 0)/2
    # a head with no audio mass anywhere has no spread: NaN, not 0
    assert math.isnan(temporal_spread(torch.zeros(1, 1, 3, 3), times, qm).item())


def hand_maps():
    """B=1, H=2, Nq=2; keys: 2 image patches (grid 1x2, 16 px), then 2 audio columns (0.1 s, 0.3 s)."""
    w = torch.tensor([[[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]],  # head 0
                       [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]]])  # head 1
    geom = {"image": ImageGeometry(grid=(1, 2), image_size=(16, 32), patch_size=(16, 16)),
            "audio": AudioGeometry(times=[0.1, 0.3], freq_bins=1, sample_rate=16000, durations=[0.4])}
    return AttentionMaps(weights={0: w}, heads={0: [0, 1]}, segments={"image": (0, 2), "audio": (2, 4)},
                         key_mask=torch.ones(1, 4, dtype=torch.bool), key_special=torch.zeros(1, 4, dtype=torch.bool),
                         query_source="latents", query_mask=torch.ones(1, 2, dtype=torch.bool),
                         key_geometry=geom, num_heads=2, query_special=torch.zeros(1, 2, dtype=torch.bool))


def test_modality_share_and_head_table_hand_computed():
    maps = hand_maps()
    share = modality_share(maps, 0)
    # head 0: image mass (1 + 0)/2 = 0.5, audio 0.5; head 1 the same
    torch.testing.assert_close(share["image"], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(share["audio"], torch.tensor([0.5, 0.5]))
    rows = head_metric_table(maps, 0)
    assert [r["head"] for r in rows] == [0, 1]
    # head 0: entropy ln2/ln4 = 0.5 per query; confidence 0.5; scaled 4*0.5 = 2;
    #   spread: query 0 -> 2 patches 16 px apart, centroid between them -> 8 px (query 1 has no image mass);
    #   query 1 -> columns 0.1 / 0.3 s -> 0.1 s (query 0 has no audio mass)
    expected0 = {"entropy": 0.5, "confidence": 0.5, "scaled_confidence": 2.0, "share_image": 0.5,
                 "share_audio": 0.5, "spread_px": 8.0, "spread_s": 0.1}
    # head 1: one-hot -> entropy 0, confidence 1, scaled 4, spreads 0
    expected1 = {"entropy": 0.0, "confidence": 1.0, "scaled_confidence": 4.0, "share_image": 0.5,
                 "share_audio": 0.5, "spread_px": 0.0, "spread_s": 0.0}
    for row, exp in zip(rows, (expected0, expected1)):
        assert row["layer"] == 0
        for k, v in exp.items():
            assert row[k] == pytest.approx(v, abs=1e-6), k


def test_modality_focus_is_read_against_a_uniform_head():
    """1 image key and 3 audio keys (item 0), 1 image and 1 audio key (item 1, two audio keys padded):
    a uniform head's image share is 1/4 in item 0 and 1/2 in item 1, so 0.375 over the items; it scores
    focus 0, not the -0.25 that |image - audio| against an even split would call "led by audio"."""
    A = torch.tensor([[[[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]],  # item 0: uniform row, image-only row
                      [[[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]]])  # item 1: uniform rows
    A = A.expand(2, 2, 2, 4).clone()  # (B, H, Nq, Nk): two heads
    A[:, 1] = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]],
                            [[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]])  # head 1 uniform everywhere
    geom = {"image": ImageGeometry(grid=(1, 1), image_size=(16, 16), patch_size=(16, 16)),
            "audio": AudioGeometry(times=[0.1, 0.3, 0.5], freq_bins=1, sample_rate=16000, durations=[0.6, 0.2])}
    key_mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    maps = AttentionMaps(weights={0: A}, heads={0: [0, 1]}, segments={"image": (0, 1), "audio": (1, 4)},
                         key_mask=key_mask, key_special=torch.zeros(2, 4, dtype=torch.bool), query_source="latents",
                         query_mask=torch.ones(2, 2, dtype=torch.bool), key_geometry=geom, num_heads=2)
    chance = uniform_modality_share(maps, 0)
    torch.testing.assert_close(chance["image"], torch.tensor([0.375, 0.375]))
    torch.testing.assert_close(chance["audio"], torch.tensor([0.625, 0.625]))
    rows = head_metric_table(maps, 0)
    # head 0: image share item 0 = (0.25 + 1)/2 = 0.625, item 1 = 0.5 -> 0.5625; focus 0.5625 - 0.375 = 0.1875
    # head 1 (uniform): share 0.375 = chance -> focus 0
    assert [image_focus(r) for r in rows] == [pytest.approx(0.1875), pytest.approx(0.0, abs=1e-7)]
    assert modality_focus(rows) == pytest.approx(0.09375)  # mean |focus|
    assert image_led_fraction(rows) == 0.5
    # a head measured before uniform shares were recorded: no focus, rather than one against 0.5
    assert image_focus({"share_image": 0.2, "share_audio": 0.8}) is None
    assert modality_focus([{"share_image": 0.2, "share_audio": 0.8}]) is None


def test_head_table_on_a_tiny_fusion():
    torch.manual_seed(0)
    cfg = FusionConfig(dim=16, heads=2, layers=1, num_latents=3, input_dims={"image": 16, "audio": 16})
    fusion = CrossAttentionFusion(cfg).eval()
    img = ModalityTokens(torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool), "image",
                         torch.tensor([[True, False, False, False, False]] * 2),
                         ImageGeometry(grid=(2, 2), image_size=(32, 32), patch_size=(16, 16), num_prefix=1))
    aud_mask = torch.tensor([[True] * 3, [True, True, False]])
    aud = ModalityTokens(torch.randn(2, 3, 16), aud_mask, "audio", torch.zeros(2, 3, dtype=torch.bool),
                         AudioGeometry(times=[0.1, 0.3, 0.5], freq_bins=1, sample_rate=16000, durations=[0.6, 0.4]))
    with torch.no_grad():
        maps = fusion([img, aud], return_maps=True).maps
    rows = head_metric_table(maps, 0)
    assert len(rows) == 2
    for r in rows:
        assert set(r) == {"layer", "head", "entropy", "confidence", "scaled_confidence", "share_image",
                          "share_audio", "uniform_share_image", "uniform_share_audio", "spread_px", "spread_s"}
        assert 0 <= r["entropy"] <= 1 and 1 <= r["scaled_confidence"]
        assert r["share_image"] + r["share_audio"] == pytest.approx(1.0, abs=1e-5)
        assert 0 <= r["spread_px"] <= 16 * math.sqrt(2) and 0 <= r["spread_s"] <= 0.4


def test_js_divergence_hand_computed():
    # 3 heads, 1 query, keys [k0, k1, pad]: heads 0 and 2 one-hot on k0, head 1 one-hot on k1.
    A = torch.tensor([[[[1.0, 0, 0]], [[0, 1.0, 0]], [[1.0, 0, 0]]]])  # (1, 3, 1, 3)
    km = torch.tensor([[True, True, False]])
    qm = torch.tensor([[True]])
    # smoothing over N_b = 2 keys: p' = [0.9995, 0.0005], q' = [0.0005, 0.9995], m = [0.5, 0.5]
    # JS = 1/2 * 2 * (0.9995 ln(0.9995/0.5) + 0.0005 ln(0.0005/0.5)) = 0.9995 ln 1.999 + 0.0005 ln 0.001 = 0.68885
    js = 0.9995 * math.log(1.999) + 0.0005 * math.log(0.001)
    D = js_divergence_matrix(A, km, qm)
    expected = torch.tensor([[0, js, 0], [js, 0, js], [0, js, 0]])
    torch.testing.assert_close(D, expected, atol=1e-6, rtol=1e-5)


def test_js_divergence_properties():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 5, 6, generator=g)
    km = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    qm = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4])
    A = logits.masked_fill(~km[:, None, None, :], float("-inf")).softmax(-1)
    D = js_divergence_matrix(A, km, qm)
    assert torch.equal(D, D.T) and torch.all(D.diagonal() == 0)
    assert torch.all(D >= 0) and torch.all(D <= LN2)
    # padded queries are never read
    A2 = A.clone()
    A2[1, :, 3:] = torch.rand(4, 2, 6, generator=g)
    torch.testing.assert_close(js_divergence_matrix(A2, km, qm), D)


def distances_to_D(d):
    """Build a JS-divergence matrix whose square root is the given symmetric distance table."""
    n = 1 + max(max(k) for k in d)
    D = torch.zeros(n, n, dtype=torch.float64)
    for (i, j), v in d.items():
        D[i, j] = D[j, i] = v ** 2
    return D


def test_redundancy_clusters_hand_computed():
    # sqrt-JS distances: {0,1} and {2,3} are tight pairs, the pairs are 0.5-0.6 apart
    D = distances_to_D({(0, 1): 0.1, (2, 3): 0.15, (0, 2): 0.5, (0, 3): 0.6, (1, 2): 0.55, (1, 3): 0.5})
    for linkage in ("single", "average", "complete"):
        assert redundancy_clusters(D, 0.2, linkage) == [[0, 1], [2, 3]]
        assert redundancy_clusters(D, 0.05, linkage) == [[0], [1], [2], [3]]
    # between the pairs: single = min 0.5, average = (0.5+0.6+0.55+0.5)/4 = 0.5375, complete = max 0.6
    assert redundancy_clusters(D, 0.52, "single") == [[0, 1, 2, 3]]
    assert redundancy_clusters(D, 0.52, "average") == [[0, 1], [2, 3]]
    assert redundancy_clusters(D, 0.55, "average") == [[0, 1, 2, 3]]
    assert redundancy_clusters(D, 0.55, "complete") == [[0, 1], [2, 3]]
    # a chain: single linkage joins it, average does not ({0,1} to 2 = (0.5 + 0.12)/2 = 0.31)
    chain = distances_to_D({(0, 1): 0.1, (1, 2): 0.12, (0, 2): 0.5})
    assert redundancy_clusters(chain, 0.15, "single") == [[0, 1, 2]]
    assert redundancy_clusters(chain, 0.15, "average") == [[0, 1], [2]]


def test_redundancy_summary_hand_computed():
    D = distances_to_D({(0, 1): 0.1, (2, 3): 0.15, (0, 2): 0.5, (0, 3): 0.6, (1, 2): 0.55, (1, 3): 0.5})
    s = redundancy_summary(D, 0.2)
    assert s["clusters"] == [[0, 1], [2, 3]]
    assert s["most_similar_pair"] == (0, 1) and s["most_similar_distance"] == pytest.approx(0.1)
    # mean off-diagonal distance = (0.1 + 0.15 + 0.5 + 0.6 + 0.55 + 0.5)/6 = 0.4
    assert s["mean_distance"] == pytest.approx(0.4)
    # mean divergence = (0.01 + 0.0225 + 0.25 + 0.36 + 0.3025 + 0.25)/6 = 0.199167
    assert s["mean_divergence"] == pytest.approx(1.195 / 6)
    single = redundancy_summary(torch.zeros(1, 1), 0.2)
    assert single["clusters"] == [[0]] and single["most_similar_pair"] is None


# -- linear probes of encoder tokens --------------------------------------------------------


def test_linear_probe_reads_a_label_that_is_in_the_features_and_not_one_that_is_not():
    from multimodal.analysis.probe import linear_probe

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    coded = np.eye(3)[y] * 3 + 0.1 * rng.standard_normal((300, 3))  # the label, one-hot, plus noise
    r = linear_probe(np.concatenate([coded, rng.standard_normal((300, 5))], 1), y)
    assert r["accuracy"] == 1.0 and r["train"] == 210 and r["test"] == 90
    noise = linear_probe(rng.standard_normal((300, 8)), y)
    assert noise["accuracy"] < 0.5 and abs(noise["chance"] - 1 / 3) < 0.1  # 3 balanced classes: ~1/3


def test_object_features_weight_patches_by_mask_cover():
    """A stub encoder whose patch tokens are their own (row, col): an object's feature must be the
    mean over its mask's pixels of the (row, col) of the patch each pixel falls in."""
    from multimodal.analysis.probe import ATTRIBUTES, object_features
    from multimodal.data.scenes import generate_scene
    from multimodal.types import ImageGeometry, ModalityTokens

    class Grid:
        def encode(self, images):
            rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
            pos = torch.stack([rows, cols], -1).reshape(1, 64, 2).repeat(len(images), 1, 1)
            tokens = torch.cat([torch.full((len(images), 1, 2), -99.0), pos], 1)  # a CLS token first
            mask = torch.ones(len(images), 65, dtype=torch.bool)
            geometry = ImageGeometry(grid=(8, 8), image_size=(128, 128), patch_size=(16, 16), num_prefix=1,
                                     original_sizes=[(128, 128)] * len(images))
            return ModalityTokens(tokens, mask, "image", ~mask, geometry)

    scenes = [generate_scene(s) for s in range(3)]
    X, labels = object_features(Grid(), scenes)
    objects = [o for s in scenes for o in s.objects]
    masks = [m for s in scenes for m in s.masks]
    assert X.shape == (len(objects), 2)
    for (row, col), obj, mask, shape, size in zip(X, objects, masks, labels["shape"], labels["size"]):
        ys, xs = np.nonzero(mask)
        assert row == pytest.approx((ys // 16).mean(), abs=1e-4) and col == pytest.approx((xs // 16).mean(), abs=1e-4)
        assert ATTRIBUTES["shape"][shape] == obj["shape"] and ATTRIBUTES["size"][size] == obj["size"]


def test_learnability_trains_a_fresh_encoder_on_one_attribute_and_reports_held_out_accuracy():
    from multimodal.analysis.probe import learnability

    curve = learnability("vit-tiny-scenes", "colour", steps=40, batch_size=16, train_scenes=160,
                         test_scenes=100, every=20)
    assert [r["step"] for r in curve] == [20, 40]
    assert 0.1 < curve[0]["chance"] < 0.4  # 6 colours
    assert curve[-1]["accuracy"] > curve[0]["chance"] + 0.3, curve  # colour is in the pixels: learned fast
    with pytest.raises(ValueError, match="attribute"):
        learnability("vit-tiny-scenes", "texture", steps=1)


def test_word_separation_is_one_when_the_text_side_cannot_tell_the_words_apart():
    from multimodal.analysis.probe import word_separation
    from multimodal.data.scenes import SHAPES
    from multimodal.train import build_model, load_config

    model = build_model(load_config("smoke", overrides={"fusion.dim": 32, "fusion.heads": 2}))
    before = word_separation(model)
    assert all(-1 <= c < 0.999 for c in before.values()), before
    text = model.encoders["text"]
    ids = text.tokenizer.convert_tokens_to_ids(list(SHAPES))
    with torch.no_grad():  # every shape word gets the word embedding of "circle"
        emb = text.model.get_input_embeddings().weight
        emb[ids] = emb[ids[0]].clone()
    after = word_separation(model)
    assert after["shape"] == pytest.approx(1.0, abs=1e-5) and after["colour"] == pytest.approx(before["colour"])


def test_probe_scenes_are_none_of_the_training_or_evaluation_scenes():
    from multimodal.analysis.probe import PROBE_SEED_STRIDE, probe_seed_base
    from multimodal.data.pool import SPLIT_OFFSETS, split_seeds

    used = {s for split in SPLIT_OFFSETS for seed in range(5) for s in split_seeds(split, 20_000, seed)}
    probe = {probe_seed_base(seed, learn) + i for seed in range(5) for learn in (False, True)
             for i in range(PROBE_SEED_STRIDE)}  # the probe's and --learn's scenes
    assert not used & probe
