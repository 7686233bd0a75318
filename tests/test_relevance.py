"""Rollout and gradient relevance: hand-computed cases and a fusion built so only some keys matter."""

from types import SimpleNamespace

import pytest
import torch

from multimodal import (AttentionMaps, AudioGeometry, CrossAttentionFusion, FusionConfig, ImageGeometry, InputError,
                        MapRequest, ModalityTokens)
from multimodal.analysis.relevance import (attention_rollout, gradient_relevance, model_score_fn,
                                           raw_attention_map)


def test_rollout_hand_computed_two_layers():
    # layer 1: heads [[.5,.5],[.5,.5]] and I -> mean [[.75,.25],[.25,.75]]; + I -> [[1.75,.25],[.25,1.75]] / 2
    #   = [[.875,.125],[.125,.875]]
    l1 = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]], [[1.0, 0.0], [0.0, 1.0]]]])  # (1, 2, 2, 2)
    # layer 2: [[.2,.8],[.6,.4]] + I = [[1.2,.8],[.6,1.4]] / row sums 2 -> [[.6,.4],[.3,.7]]
    #   (column sums are 1.8 and 2.2: normalising columns would be wrong)
    l2 = torch.tensor([[[[0.2, 0.8], [0.6, 0.4]]]])  # (1, 1, 2, 2)
    # R = A2 @ A1 = [[.6*.875 + .4*.125, .6*.125 + .4*.875], [.3*.875 + .7*.125, .3*.125 + .7*.875]]
    #   = [[.575, .425], [.35, .65]]
    R = attention_rollout([l1, l2])
    torch.testing.assert_close(R, torch.tensor([[[0.575, 0.425], [0.35, 0.65]]]))
    torch.testing.assert_close(R.sum(-1), torch.ones(1, 2))


def test_rollout_discard_normalises_rows_and_head_fusion():
    A = torch.tensor([[[[0.1, 0.9], [0.3, 0.7]]]])
    # discard 25% of 4 entries = the smallest (0.1): [[0,.9],[.3,.7]] + I = [[1,.9],[.3,1.7]]; rows / 1.9 and / 2.0
    R = attention_rollout([A], discard_ratio=0.25)
    torch.testing.assert_close(R, torch.tensor([[[1 / 1.9, 0.9 / 1.9], [0.15, 0.85]]]))
    # no residual: one layer comes back unchanged (its rows already sum to 1)
    torch.testing.assert_close(attention_rollout([A], add_residual=False), A[:, 0])
    # max over heads: max(I, all-.5) = [[1,.5],[.5,1]]; + I = [[2,.5],[.5,2]] / 2.5 -> [[.8,.2],[.2,.8]]
    heads = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]]])
    torch.testing.assert_close(attention_rollout([heads], head_fusion="max"), torch.tensor([[[0.8, 0.2], [0.2, 0.8]]]))
    with pytest.raises(InputError):
        attention_rollout([])
    with pytest.raises(InputError):
        attention_rollout([A], head_fusion="median")


def test_rollout_rows_sum_to_one_on_random_layers():
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(2, 3, 5, 5, generator=g).softmax(-1) for _ in range(4)]
    for ratio in (0.0, 0.5, 0.9):
        R = attention_rollout(layers, discard_ratio=ratio)
        assert R.shape == (2, 5, 5) and torch.all(R >= 0)
        torch.testing.assert_close(R.sum(-1), torch.ones(2, 5))


# ---------------------------------------------------------------------------------------
# Hand-built maps: the score is a known linear function of the weights
# ---------------------------------------------------------------------------------------

A0 = torch.tensor([[[[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]],  # head 0, queries 0 and 1
                    [[0.2, 0.4, 0.4], [0.0, 1.0, 0.0]]]])  # head 1; (B, H, Nq, Nk) = (1, 2, 2, 3)
C = torch.tensor([-1.0, 2.0, 0.0])  # dy/dA[..., j] = c_j


def hand_maps(w):
    return AttentionMaps(weights={0: w}, heads={0: [0, 1]}, segments={"image": (0, 3)},
                         key_mask=torch.ones(1, 3, dtype=torch.bool), key_special=torch.zeros(1, 3, dtype=torch.bool),
                         query_source="latents", query_mask=torch.ones(1, 2, dtype=torch.bool),
                         key_geometry={"image": ImageGeometry(grid=(1, 3), image_size=(16, 48), patch_size=(16, 16))},
                         num_heads=2, query_special=torch.zeros(1, 2, dtype=torch.bool))


def hand_score_fn(tokens):
    A = A0.clone().requires_grad_(True)
    return (A * C).sum((1, 2, 3)), hand_maps(A)  # y = sum_{h,q,j} c_j A[h,q,j]


def test_gradient_relevance_hand_computed():
    rel = gradient_relevance(hand_score_fn, {})
    # grad * A = c_j A; clamp(min=0) keeps key 1 only (c = 2): 2 A[h, q, 1]
    # mean over heads: q0 = 2 (0.25 + 0.4)/2 = 0.65, q1 = 2 (0.6 + 1.0)/2 = 1.6
    # uniform query weights 1/2: R_1 = (0.65 + 1.6)/2 = 1.125; keys 0 (c < 0) and 2 (c = 0) get 0
    torch.testing.assert_close(rel.scores, torch.tensor([[0.0, 1.125, 0.0]]))
    torch.testing.assert_close(rel.image(), torch.tensor([[[0.0, 1.125, 0.0]]]))  # (B, gh, gw)
    torch.testing.assert_close(rel.by_modality()["image"], rel.scores)
    assert list(rel.per_layer) == [0]
    # custom query weights: only query 1 -> 1.6
    only_q1 = gradient_relevance(hand_score_fn, {}, query_weights=torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(only_q1.scores, torch.tensor([[0.0, 1.6, 0.0]]))


def test_raw_attention_map_hand_computed():
    rel = raw_attention_map(hand_maps(A0))
    # head mean: q0 = [.35, .325, .325], q1 = [.1, .8, .1]; uniform queries -> [.225, .5625, .2125]
    torch.testing.assert_close(rel.scores, torch.tensor([[0.225, 0.5625, 0.2125]]))
    torch.testing.assert_close(rel.scores.sum(-1), torch.ones(1))


# ---------------------------------------------------------------------------------------
# A real fusion block where some keys carry no value: they cannot affect the score
# ---------------------------------------------------------------------------------------

DEAD_PATCHES = (1, 3)  # of the 2x2 grid; key index = 1 (CLS) + patch


def fusion_with_dead_keys():
    """No position/modality codes and zero V bias: a constant token is LayerNormed to 0, so its
    value vector is exactly 0 and no attention on it can change the output."""
    torch.manual_seed(0)
    cfg = FusionConfig(dim=16, heads=2, layers=2, num_latents=3, positional=False, modality_embeddings=False)
    fusion = CrossAttentionFusion(cfg).eval()
    with torch.no_grad():
        for layer in fusion.layers:
            layer.attn.kv.bias[16:] = 0  # V bias
            layer.norm_kv.bias.zero_()
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 5, 16, generator=g)
    for p in DEAD_PATCHES:
        img[:, 1 + p] = 2.0  # constant vector -> LayerNorm 0 -> value 0
    special = torch.zeros(2, 5, dtype=torch.bool)
    special[:, 0] = True
    image = ModalityTokens(img, torch.ones(2, 5, dtype=torch.bool), "image", special,
                           ImageGeometry(grid=(2, 2), image_size=(32, 32), patch_size=(16, 16), num_prefix=1))
    audio = ModalityTokens(torch.randn(2, 3, 16, generator=g), torch.tensor([[True] * 3, [True, True, False]]),
                           "audio", torch.zeros(2, 3, dtype=torch.bool),
                           AudioGeometry(times=[0.1, 0.3, 0.5], freq_bins=1, sample_rate=16000, durations=[0.6, 0.4]))
    readout = torch.randn(16, generator=g)

    def score_fn(tokens, request=True):
        out = fusion(tokens, return_maps=request)
        return out.pooled @ readout, out.maps  # (B,)
    return score_fn, {"image": image, "audio": audio}


def test_gradient_relevance_concentrates_on_keys_that_affect_the_score():
    score_fn, tokens = fusion_with_dead_keys()
    with torch.no_grad():  # gradient_relevance turns grad on itself
        rel = gradient_relevance(score_fn, tokens)
    assert rel.scores.shape == (2, 8) and torch.all(rel.scores >= 0)
    img = rel.image()  # (B, gh, gw)
    assert img.shape == (2, 2, 2)
    dead = img.flatten(1)[:, list(DEAD_PATCHES)]
    live = img.flatten(1)[:, [0, 2]]
    assert torch.all(dead == 0) and live.sum() > 0
    # raw attention does put weight on the dead patches: relevance is not just attention
    assert torch.all(raw_attention_map(score_fn(tokens)[1]).image().flatten(1)[:, list(DEAD_PATCHES)] > 0)
    aud = rel.audio()
    assert aud.shape == (2, 3) and aud[1, 2] == 0  # padded audio column
    assert set(rel.by_modality()) == {"image", "audio"}
    assert rel.by_modality()["image"].shape == (2, 5) and torch.all(rel.by_modality()["image"][:, 0] == 0)  # CLS
    torch.testing.assert_close(sum(rel.per_layer.values()), rel.scores)
    # items are independent: item 1 alone gets the same relevance as inside the batch
    one = {m: ModalityTokens(t.tokens[1:], t.mask[1:], t.modality, t.special[1:], t.geometry)
           for m, t in tokens.items()}
    torch.testing.assert_close(gradient_relevance(score_fn, one).scores, rel.scores[1:], atol=1e-6, rtol=1e-4)


def test_gradient_relevance_refuses_maps_outside_the_graph():
    score_fn, tokens = fusion_with_dead_keys()
    with pytest.raises(InputError, match="all heads"):
        gradient_relevance(lambda t: score_fn(t, MapRequest(heads=(0,))), tokens)
    with pytest.raises(InputError, match="no attention maps|autograd"):
        gradient_relevance(lambda t: (score_fn(t)[0], hand_maps(A0)), tokens)


def test_model_score_fn_uses_fuse_with_maps():
    score_fn, tokens = fusion_with_dead_keys()
    calls = []

    class FakeModel:  # MultimodalModel.fuse's interface: .score and .maps
        def fuse(self, toks, head_mask=None, return_maps=False):
            calls.append(return_maps)
            score, maps = score_fn(toks, return_maps)
            return SimpleNamespace(score=score, maps=maps)
    rel = gradient_relevance(model_score_fn(FakeModel()), tokens)
    torch.testing.assert_close(rel.scores, gradient_relevance(score_fn, tokens).scores)
    assert calls == [True]


def test_fusion_rollout_averages_the_head_means_of_the_layers_so_far():
    from multimodal.analysis.relevance import fusion_rollout

    torch.manual_seed(0)
    cfg = FusionConfig(dim=32, heads=4, layers=3, query="text", query_self_attention=True)
    fusion = CrossAttentionFusion(cfg).eval()
    mask = torch.ones(2, 5, dtype=torch.bool)
    text = ModalityTokens(torch.randn(2, 5, 32), mask, "text", torch.zeros_like(mask), None)
    image = ModalityTokens(torch.randn(2, 9, 32), torch.ones(2, 9, dtype=torch.bool), "image",
                           torch.zeros(2, 9, dtype=torch.bool), None)
    with torch.no_grad():
        maps = fusion([text, image], return_maps=True).maps
    roll = fusion_rollout(maps)
    means = [maps.weights[l].mean(1, keepdim=True) for l in range(3)]
    torch.testing.assert_close(roll.weights[0], means[0])
    torch.testing.assert_close(roll.weights[2], (means[0] + means[1] + means[2]) / 3)
    torch.testing.assert_close(roll.weights[1].sum(-1), torch.ones(2, 1, 5))
    with pytest.raises(InputError, match="rollout averages every head"):
        with torch.no_grad():
            fusion_rollout(fusion([text, image], return_maps=MapRequest(heads=(0, 1))).maps)
