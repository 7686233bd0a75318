"""The fusion block: both paths agree, padding is invisible, head_mask removes heads, kinds sum to 1."""

import pytest
import torch

from multimodal import (AttentionMaps, AudioGeometry, CrossAttentionFusion, FusionConfig, ImageGeometry,
                        InputError, MapRequest, ModalityTokens, TextGeometry)
from multimodal.fusion import competitive_attention, entmax15_attention, sparsemax_attention, topk_attention


def text_tokens(B=2, N=6, D=32, lengths=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [N] * B
    mask = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]  # (B, N)
    special = torch.zeros(B, N, dtype=torch.bool)
    special[:, 0] = True
    geom = TextGeometry(texts=["x"] * B, tokens=[["t"] * N] * B, spans=[[(0, 1)] * N] * B)
    return ModalityTokens(torch.randn(B, N, D, generator=g), mask, "text", special, geom)


def image_tokens(B=2, grid=(4, 4), D=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    N = 1 + grid[0] * grid[1]
    special = torch.zeros(B, N, dtype=torch.bool)
    special[:, 0] = True
    geom = ImageGeometry(grid=grid, image_size=(64, 64), patch_size=(16, 16), num_prefix=1)
    return ModalityTokens(torch.randn(B, N, D, generator=g), torch.ones(B, N, dtype=torch.bool), "image",
                          special, geom)


def audio_tokens(B=2, T=5, Fq=3, D=40, seed=2):
    g = torch.Generator().manual_seed(seed)
    N = T * Fq
    geom = AudioGeometry(times=[0.1 * (t + 1) for t in range(T)], freq_bins=Fq, sample_rate=16000,
                         durations=[0.6] * B)
    return ModalityTokens(torch.randn(B, N, D, generator=g), torch.ones(B, N, dtype=torch.bool), "audio",
                          torch.zeros(B, N, dtype=torch.bool), geom)


def make(query="latents", attention="softmax", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = FusionConfig(dim=32, heads=4, layers=2, query=query, num_latents=5, attention=attention,
                       input_dims={"text": 32, "image": 48, "audio": 40}, **kw)
    return CrossAttentionFusion(cfg).eval()


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
def test_fast_and_explicit_paths_agree(grad):
    fusion = make()
    inputs = [text_tokens(lengths=[6, 3]), image_tokens(), audio_tokens()]
    with torch.set_grad_enabled(grad):  # the explicit path has a differentiable and a per-item branch
        fast = fusion(inputs)
        slow = fusion(inputs, return_maps=True)
    assert fast.maps is None and slow.maps is not None
    assert (fast.queries - slow.queries).abs().max().item() <= 1e-5
    assert (fast.pooled - slow.pooled).abs().max().item() <= 1e-5


def test_maps_shapes_segments_and_row_sums():
    fusion = make()
    maps = fusion([text_tokens(), image_tokens(), audio_tokens()], return_maps=True).maps
    assert maps.layers == [0, 1]
    assert maps.segments == {"text": (0, 6), "image": (6, 23), "audio": (23, 38)}
    w = maps.weights[0]
    assert w.shape == (2, 4, 5, 38)  # (B, H, Nq, Nk)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5))
    assert maps.image_maps(0).shape == (2, 4, 5, 4, 4)
    assert maps.audio_maps(0).shape == (2, 4, 5, 5)
    assert maps.text_maps(0).shape == (2, 4, 5, 6)
    # audio maps sum each time column's frequency bands
    a = w[..., 23:38].reshape(2, 4, 5, 5, 3).sum(-1)
    torch.testing.assert_close(maps.audio_maps(0), a)
    # renormalised within a modality: each row sums to 1 over that modality's content tokens
    torch.testing.assert_close(maps.image_maps(1, renormalise=True).sum((-1, -2)), torch.ones(2, 4, 5))
    share = maps.modality_share(0)
    torch.testing.assert_close(sum(share.values()), torch.ones(2, 4, 5))


def test_padded_keys_get_zero_weight_and_padding_is_invisible():
    fusion = make(query="image")
    text = text_tokens(B=2, N=6, lengths=[6, 3])
    img = image_tokens()
    out = fusion([text, img], return_maps=True)
    w = out.maps.weights[1]  # (B, H, Nq, Nk) keys = text only
    assert torch.all(w[1, ..., 3:] == 0)
    # item 1 alone, unpadded, gives the same result as inside the padded batch
    short = ModalityTokens(text.tokens[1:2, :3], text.mask[1:2, :3], "text", text.special[1:2, :3], text.geometry)
    img1 = ModalityTokens(img.tokens[1:2], img.mask[1:2], "image", img.special[1:2], img.geometry)
    for maps in (False, True):
        alone = fusion([short, img1], return_maps=maps)
        batched = fusion([text, img], return_maps=maps)
        assert (alone.queries[0] - batched.queries[1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("self_attention,compete", [(False, False), (True, False), (True, True)])
def test_padded_text_queries_do_not_change_pooled_output(self_attention, compete):
    fusion = make(query="text", query_self_attention=self_attention, compete=compete)
    text = text_tokens(B=2, N=6, lengths=[6, 4])
    img = image_tokens()
    batched = fusion([text, img])
    short = ModalityTokens(text.tokens[1:2, :4], text.mask[1:2, :4], "text", text.special[1:2, :4], text.geometry)
    img1 = ModalityTokens(img.tokens[1:2], img.mask[1:2], "image", img.special[1:2], img.geometry)
    alone = fusion([short, img1])
    assert (alone.pooled[0] - batched.pooled[1]).abs().max().item() <= 1e-5


def test_head_mask_removes_exactly_one_heads_contribution():
    fusion = make()
    inputs = [text_tokens(), image_tokens()]
    layer = fusion.layers[0].attn
    x = torch.randn(2, 5, 32)
    kv = torch.randn(2, 23, 32)
    key_mask = torch.ones(2, 23, dtype=torch.bool)
    hm = torch.tensor([1.0, 0.0, 1.0, 1.0])
    masked, w, _ = layer(x, kv, key_mask, hm, need_weights=True)
    # Recompute per-head outputs by hand: head 1's slice must be exactly zero before `out`.
    v = layer.kv(kv).view(2, 23, 2, 4, 8)[:, :, 1].transpose(1, 2)  # (B, H, Nk, hd)
    per_head = (w @ v) * hm.view(1, 4, 1, 1)  # (B, H, Nq, hd)
    concat = per_head.transpose(1, 2).reshape(2, 5, 32)
    torch.testing.assert_close(masked, layer.out(concat))
    assert torch.all(per_head[:, 1] == 0)
    # with every head masked the attention output is exactly the output bias
    none, _, _ = layer(x, kv, key_mask, torch.zeros(4))
    torch.testing.assert_close(none, layer.out.bias.expand_as(none), rtol=0, atol=0)
    # and the whole block changes when a head is removed (so the mask is wired through)
    full = fusion(inputs).pooled
    ablated = fusion(inputs, head_mask=torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 1]])).pooled
    assert (full - ablated).abs().max() > 1e-4
    # head_mask is differentiable (gradient head importance)
    gate = torch.ones(2, 4, requires_grad=True)
    fusion(inputs, head_mask=gate).pooled.sum().backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_attended_is_the_sum_of_the_cross_attention_outputs():
    fusion = make(query="text", query_self_attention=True)
    inputs = [text_tokens(lengths=[6, 3]), image_tokens()]
    outputs = []
    hooks = [layer.attn.register_forward_hook(lambda mod, args, out: outputs.append(out[0])) for layer in fusion.layers]
    try:
        out = fusion(inputs)
    finally:
        for h in hooks:
            h.remove()
    assert len(outputs) == 2
    torch.testing.assert_close(out.attended, outputs[0] + outputs[1])
    # with every head masked nothing comes in from the keys: the image no longer changes `attended`
    off = torch.zeros(2, 4)
    other = image_tokens(seed=7)
    torch.testing.assert_close(fusion(inputs, head_mask=off).attended,
                               fusion([inputs[0], other], head_mask=off).attended)
    assert (fusion([inputs[0], other]).attended - out.attended).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["softmax", "topk", "sparsemax", "entmax15"])
def test_attention_kinds_sum_to_one_and_respect_padding(kind):
    fusion = make(query="image", attention=kind, top_k=2)
    out = fusion([text_tokens(lengths=[6, 3]), image_tokens()], return_maps=True)
    with torch.no_grad():
        again = fusion([text_tokens(lengths=[6, 3]), image_tokens()], return_maps=True)
    torch.testing.assert_close(again.maps.weights[1], out.maps.weights[1])
    torch.testing.assert_close(again.queries, out.queries)
    w = out.maps.weights[0]
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    assert torch.all(w[1, ..., 3:] == 0)
    assert torch.all(w >= 0)
    if kind == "topk":
        assert torch.all((w > 0).sum(-1) <= 2)
    # explicit path with and without maps gives the same output for every kind
    torch.testing.assert_close(fusion([text_tokens(lengths=[6, 3]), image_tokens()]).queries, out.queries)


def test_competitive_attention_shares_each_key_among_the_queries():
    # two queries, three keys (the last one padded), one padded query
    z = torch.tensor([[[[2.0, 0.0, 5.0], [0.0, 1.0, 5.0], [9.0, 9.0, 9.0]]]])  # (1, 1, 3, 3)
    mask = torch.tensor([True, True, False]).view(1, 1, 1, 3)
    qmask = torch.tensor([True, True, False]).view(1, 1, 3, 1)
    w = competitive_attention(z, mask, qmask, eps=0.0)
    s0 = torch.tensor([2.0, 0.0]).softmax(0)  # key 0 shared between queries 0 and 1
    s1 = torch.tensor([0.0, 1.0]).softmax(0)
    share = torch.stack([torch.stack([s0[0], s1[0]]), torch.stack([s0[1], s1[1]])])  # (query, key)
    torch.testing.assert_close(w[0, 0, :2, :2], share / share.sum(1, keepdim=True))
    assert torch.all(w[..., 2] == 0)  # the padded key
    assert torch.isfinite(w).all()
    # through the block: every row sums to 1, and the maps differ from plain softmax
    fusion = make(query="text", compete=True)
    out = fusion([text_tokens(lengths=[6, 3]), image_tokens()], return_maps=True)
    w = out.maps.weights[0]
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    plain = make(query="text")
    plain.load_state_dict(fusion.state_dict())
    assert (plain([text_tokens(lengths=[6, 3]), image_tokens()], return_maps=True).maps.weights[0] - w).abs().max() > 1e-3
    torch.testing.assert_close(fusion([text_tokens(lengths=[6, 3]), image_tokens()]).queries, out.queries)


def test_sink_queries_take_the_keys_no_real_query_claims():
    # two queries, two keys; one sink with a large logit on key 1 only
    z = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # (1, 1, 2, 2)
    sink = torch.tensor([[[[0.0, 8.0]]]])  # (1, 1, 1, 2)
    mask = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    qmask = torch.ones(1, 1, 2, 1, dtype=torch.bool)
    w = competitive_attention(z, mask, qmask, eps=0.0, sink_logits=sink)
    share = torch.cat([z, sink], 2).softmax(2)[0, 0, :2]  # (query, key) with the sink's share removed
    torch.testing.assert_close(w[0, 0], share / share.sum(1, keepdim=True))
    without = competitive_attention(z, mask, qmask, eps=0.0)
    assert w[0, 0, 0, 1] < 0.01 < without[0, 0, 0, 1]  # key 1 went to the sink, not to query 0
    # through the block: sinks are per-layer parameters, rows still sum to 1, outputs change with them
    fusion = make(query="text", compete=True, sinks=2)
    assert fusion.layers[0].attn.sinks.shape == (fusion.cfg.heads, 2, fusion.cfg.dim // fusion.cfg.heads)
    out = fusion([text_tokens(lengths=[6, 3]), image_tokens()], return_maps=True)
    w = out.maps.weights[0]
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    with torch.no_grad():
        for layer in fusion.layers:
            layer.attn.sinks.fill_(0.0).add_(torch.randn_like(layer.attn.sinks))
    assert (fusion([text_tokens(lengths=[6, 3]), image_tokens()], return_maps=True).maps.weights[0] - w).abs().max() > 1e-3
    with pytest.raises(InputError, match="FusionConfig.sinks"):
        FusionConfig(sinks=2)  # no competition to take part in


def test_sparse_kinds_match_hand_computed_cases():
    mask = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    z = torch.tensor([[[[2.0, 1.0, -1.0]]]])
    # sparsemax: support {0}: tau = 2 - 1 = 1 -> p = [1, 0, 0] (key 1 sits exactly at tau: a tie)
    torch.testing.assert_close(sparsemax_attention(z, mask), torch.tensor([[[[1.0, 0.0, 0.0]]]]))
    z2 = torch.tensor([[[[0.5, 0.3, -1.0]]]])
    # support {0, 1}: tau = (0.8 - 1)/2 = -0.1 -> p = [0.6, 0.4, 0]
    torch.testing.assert_close(sparsemax_attention(z2, mask), torch.tensor([[[[0.6, 0.4, 0.0]]]]))
    # entmax15 of equal logits is uniform; a dominant logit takes all mass
    torch.testing.assert_close(entmax15_attention(torch.zeros(1, 1, 1, 3), mask), torch.full((1, 1, 1, 3), 1 / 3))
    assert entmax15_attention(torch.tensor([[[[10.0, 0.0, 0.0]]]]), mask)[..., 0].item() == pytest.approx(1.0)
    # entmax15 on [1, 0]: p_i = [z_i/2 - tau]^2 with sum 1 -> tau solves (0.5-t)^2 + t^2 = 1
    tau = (0.5 - (2 - 0.25) ** 0.5) / 2
    expected = torch.tensor([(0.5 - tau) ** 2, tau ** 2])
    got = entmax15_attention(torch.tensor([[[[1.0, 0.0]]]]), torch.ones(1, 1, 1, 2, dtype=torch.bool))
    torch.testing.assert_close(got.flatten(), expected, atol=1e-6, rtol=0)
    # top-k keeps the k largest
    got = topk_attention(torch.tensor([[[[3.0, 1.0, 2.0]]]]), mask, 2).flatten()
    assert got[1] == 0 and got[0] > got[2] > 0


def jacobian(attend, z, mask=None):
    """(Nk, Nk) Jacobian J[i, j] = dp_i / dz_j of one row of logits, through autograd."""
    mask = torch.ones(z.shape[-1], dtype=torch.bool) if mask is None else torch.tensor(mask)
    return torch.autograd.functional.jacobian(lambda x: attend(x.view(1, 1, 1, -1), mask.view(1, 1, 1, -1)).flatten(), z)


A = 0.75 / 7 ** 0.5  # entmax15, two keys with z/2 half a unit apart: J = [[A, -A], [-A, A]]
ENTMAX_TWO = [0.8307189138830738, 0.1692810861169262]  # p for z = [1, 0]: tau = (1 - sqrt 7) / 4

# (kind, logits, mask, p, J): every number worked out by hand from p and its support
HAND_JACOBIANS = {
    # sparsemax J = diag(s) - s s^T / |S| on the support S = {p > 0}
    "sparsemax-tie": ("sparsemax", [1.0, 0.0, 0.0], None, [1.0, 0.0, 0.0], [[0.0] * 3] * 3),  # tau = 0: keys 1, 2 tie
    "sparsemax-tie-2-1-m1": ("sparsemax", [2.0, 1.0, -1.0], None, [1.0, 0.0, 0.0], [[0.0] * 3] * 3),  # tau = 1 = z_1
    "sparsemax-two": ("sparsemax", [1.0, 0.5, -1.0], None, [0.75, 0.25, 0.0],  # tau = (1.5 - 1) / 2 = 0.25
                      [[0.5, -0.5, 0.0], [-0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]),
    "sparsemax-masked": ("sparsemax", [1.0, 0.5, 9.0, -1.0], [True, True, False, True], [0.75, 0.25, 0.0, 0.0],
                         [[0.5, -0.5, 0.0, 0.0], [-0.5, 0.5, 0.0, 0.0], [0.0] * 4, [0.0] * 4]),
    "sparsemax-large": ("sparsemax", [1e4, 1e4 - 0.5, 0.0, -1e4], None, [0.75, 0.25, 0.0, 0.0],
                        [[0.5, -0.5, 0.0, 0.0], [-0.5, 0.5, 0.0, 0.0], [0.0] * 4, [0.0] * 4]),
    "sparsemax-large-tie": ("sparsemax", [1e4, 1e4 - 1.0, -1e4], None, [1.0, 0.0, 0.0], [[0.0] * 3] * 3),
    "sparsemax-small": ("sparsemax", [3e-4, 1e-4, 0.0, -1e-4], None,  # all four kept: tau = (3e-4 - 1) / 4
                        [0.250225, 0.250025, 0.249925, 0.249825],
                        [[0.75, -0.25, -0.25, -0.25], [-0.25, 0.75, -0.25, -0.25],
                         [-0.25, -0.25, 0.75, -0.25], [-0.25, -0.25, -0.25, 0.75]]),
    # entmax15 J = diag(g) - g g^T / sum(g), g = sqrt(p)
    "entmax15-tie": ("entmax15", [2.0, 0.0, 0.0], None, [1.0, 0.0, 0.0], [[0.0] * 3] * 3),  # z/2 = [1, 0, 0], tau = 0
    "entmax15-2-1-m1": ("entmax15", [2.0, 1.0, -1.0], None, ENTMAX_TWO + [0.0],  # key 2 is 0.09 below tau
                        [[A, -A, 0.0], [-A, A, 0.0], [0.0, 0.0, 0.0]]),
    "entmax15-uniform": ("entmax15", [0.0, 0.0, 0.0], None, [1 / 3] * 3,  # g = 1/sqrt 3: J = (I - 1/3) / sqrt 3
                         [[0.3849001794597505, -0.19245008972987526, -0.19245008972987526],
                          [-0.19245008972987526, 0.3849001794597505, -0.19245008972987526],
                          [-0.19245008972987526, -0.19245008972987526, 0.3849001794597505]]),
    "entmax15-masked": ("entmax15", [2.0, 1.0, 9.0, -1.0], [True, True, False, True], ENTMAX_TWO + [0.0, 0.0],
                        [[A, -A, 0.0, 0.0], [-A, A, 0.0, 0.0], [0.0] * 4, [0.0] * 4]),
    "entmax15-large": ("entmax15", [1e4, 1e4 - 1.0, -1e4], None, ENTMAX_TWO + [0.0],
                       [[A, -A, 0.0], [-A, A, 0.0], [0.0, 0.0, 0.0]]),
    "entmax15-large-tie": ("entmax15", [1e4 + 2.0, 1e4, 1e4], None, [1.0, 0.0, 0.0], [[0.0] * 3] * 3),
    # z/2 = [h, 0, -h], h = 5e-5: g = c + u with u = sqrt((1 - 2 h^2) / 3), sum(g) = 3u
    "entmax15-small": ("entmax15", [1e-4, 0.0, -1e-4], None,
                       [0.3333910691934413, 0.3333333316666667, 0.3332755991398921],
                       [[0.38491684372079105, -0.1924667559154167, -0.19245008780537437],
                        [-0.1924667559154167, 0.3849001784975, -0.19243342258208337],
                        [-0.19245008780537437, -0.19243342258208337, 0.3848835103874577]]),
}


@pytest.mark.parametrize("case", list(HAND_JACOBIANS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_kinds_jacobians_match_hand_computed_cases(case, dtype):
    kind, z, mask, p, J = HAND_JACOBIANS[case]
    attend = {"sparsemax": sparsemax_attention, "entmax15": entmax15_attention}[kind]
    z = torch.tensor(z, dtype=dtype)
    m = torch.ones(len(z), dtype=torch.bool) if mask is None else torch.tensor(mask)
    tol = dict(atol=1e-6, rtol=0) if dtype == torch.float32 else dict(atol=1e-12, rtol=0)
    torch.testing.assert_close(attend(z.view(1, 1, 1, -1), m.view(1, 1, 1, -1)).flatten(),
                               torch.tensor(p, dtype=dtype), **tol)
    torch.testing.assert_close(jacobian(attend, z, mask), torch.tensor(J, dtype=dtype), **tol)


@pytest.mark.parametrize("attend", [sparsemax_attention, entmax15_attention], ids=["sparsemax", "entmax15"])
def test_sparse_kinds_pass_gradcheck_away_from_ties(attend):
    g = torch.Generator().manual_seed(0)
    for scale in (1e-4, 1.0, 5.0):
        z = (torch.randn(2, 3, 4, 7, generator=g, dtype=torch.float64) * scale).requires_grad_(True)  # (B, H, Nq, Nk)
        mask = torch.tensor([[True] * 7, [True, True, False, True, True, False, False]]).view(2, 1, 1, 7)
        p = attend(z, mask)
        assert torch.all(p[1, ..., [2, 5, 6]] == 0)
        if attend is sparsemax_attention:  # a finite difference must not cross the threshold
            tau = (z - p).masked_fill(p == 0, float("nan")).nanmean(-1, keepdim=True)  # p = z - tau on the support
            assert ((z - tau).abs()[mask.expand_as(z)] > 1e-4 * scale).all()
        assert torch.autograd.gradcheck(attend, (z, mask), eps=1e-6 * scale, atol=1e-7)


@pytest.mark.parametrize("kind", ["sparsemax", "entmax15"])
def test_sparse_kinds_send_no_gradient_to_padded_keys(kind):
    fusion = make(query="image", attention=kind)
    text = text_tokens(lengths=[6, 3])
    tokens = text.tokens.clone().requires_grad_(True)
    out = fusion([ModalityTokens(tokens, text.mask, "text", text.special, text.geometry), image_tokens()])
    out.pooled.square().sum().backward()
    assert torch.isfinite(tokens.grad).all()
    assert torch.all(tokens.grad[1, 3:] == 0) and tokens.grad[1, :3].abs().sum() > 0


def test_map_request_keeps_only_named_layers_and_heads():
    fusion = make()
    inputs = [text_tokens(), image_tokens(), audio_tokens()]
    full = fusion(inputs, return_maps=True).maps
    part = fusion(inputs, return_maps=MapRequest(layers=(1,), heads=(0, 3))).maps
    assert part.layers == [1] and part.heads[1] == [0, 3]
    torch.testing.assert_close(part.weights[1], full.weights[1][:, [0, 3]])
    with pytest.raises(InputError, match="layer 0 was not requested"):
        part.image_maps(0)
    with pytest.raises(InputError, match="outside"):
        fusion(inputs, return_maps=MapRequest(heads=(9,)))


def test_save_and_load_round_trip(tmp_path):
    fusion = make(query="text")
    maps = fusion([text_tokens(), image_tokens(), audio_tokens()], return_maps=True).maps
    npz, meta = maps.save(tmp_path / "maps")
    assert npz.exists() and meta.exists()
    back = AttentionMaps.load(tmp_path / "maps.npz")
    assert back.segments == maps.segments and back.layers == maps.layers
    assert back.key_geometry["image"] == maps.key_geometry["image"]
    assert back.query_geometry == maps.query_geometry
    torch.testing.assert_close(back.image_maps(1), maps.image_maps(1))
    torch.testing.assert_close(back.audio_maps(0, renormalise=True), maps.audio_maps(0, renormalise=True))


def test_bad_inputs_get_clear_errors():
    fusion = make(query="text")
    with pytest.raises(InputError, match="give a text input"):
        fusion([image_tokens()])
    with pytest.raises(InputError, match="nothing to attend to"):
        fusion([text_tokens()])
    wrong = image_tokens(D=64)
    with pytest.raises(InputError, match="64 wide but this fusion block expects 48"):
        fusion([text_tokens(), wrong])
    maps = fusion([text_tokens(), image_tokens()], return_maps=True).maps
    with pytest.raises(InputError, match="no audio maps"):
        maps.audio_maps(0)
    with pytest.raises(InputError, match="FusionConfig.attention"):
        FusionConfig(attention="flash")
    with pytest.raises(InputError, match="FusionConfig.compete"):
        FusionConfig(compete=True, attention="entmax15")  # it would silently ignore the kind
    with pytest.raises(InputError, match="unknown fusion config key"):
        FusionConfig.from_dict({"dims": 3})
    with pytest.raises(InputError, match="head_mask"):
        fusion([text_tokens(), image_tokens()], head_mask=torch.ones(3, 4))


def test_config_round_trip():
    cfg = FusionConfig(dim=64, heads=4, query="audio", input_dims={"text": 128})
    assert FusionConfig.from_dict(cfg.to_dict()) == cfg


def test_entmax15_gradients_are_finite_where_the_support_is_a_single_key():
    logits = torch.tensor([[[[10.0, 0.0, 0.0, -3.0], [1.0, 1.0, 0.5, 0.0]]]], requires_grad=True)
    mask = torch.tensor([[[[True, True, True, False]]]])
    p = entmax15_attention(logits, mask)
    (p * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 0, 1].abs().sum() > 0  # the dense row does learn
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 1, 2))


# -- partial map requests: only the asked heads take the explicit path ---------------------

PARTIAL_REQUESTS = [MapRequest(layers=(1,), heads=(2,)), MapRequest(layers=(0,), heads=(3, 0)),
                    MapRequest(heads=(1, 2)), MapRequest(layers=(0, 1), heads=(0, 2, 3)), MapRequest(layers=(1,))]
PARTIAL_MODELS = {  # query source, attention kind, other config; text is padded (keys or queries)
    "latents-softmax": ("latents", "softmax", {}),
    "text-softmax": ("text", "softmax", {}),
    "image-softmax-self": ("image", "softmax", {"query_self_attention": True}),
    "latents-topk": ("latents", "topk", {"top_k": 2}),
    "image-sparsemax": ("image", "sparsemax", {}),
    "text-entmax15": ("text", "entmax15", {}),
    "text-compete": ("text", "softmax", {"compete": True}),
    "text-compete-sinks": ("text", "softmax", {"compete": True, "sinks": 2}),
    "latents-compete-sinks": ("latents", "softmax", {"compete": True, "sinks": 2}),
}
ABLATE = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]])


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
@pytest.mark.parametrize("model", list(PARTIAL_MODELS))
def test_partial_request_equals_all_heads_cut(model, grad):
    query, kind, extra = PARTIAL_MODELS[model]
    fusion = make(query=query, attention=kind, **extra)
    inputs = [text_tokens(lengths=[6, 3]), image_tokens(), audio_tokens()]
    with torch.set_grad_enabled(grad):
        for head_mask in (None, ABLATE):
            full = fusion(inputs, head_mask=head_mask, return_maps=True)
            plain = fusion(inputs, head_mask=head_mask)
            for request in PARTIAL_REQUESTS:
                part = fusion(inputs, head_mask=head_mask, return_maps=request)
                heads = list(request.heads or range(4))
                assert part.maps.layers == list(request.layers or (0, 1))
                for l in part.maps.layers:
                    assert part.maps.heads[l] == heads
                    close(part.maps.weights[l], full.maps.weights[l][:, heads])
                for out in (full, plain):
                    close(part.queries, out.queries)
                    close(part.pooled, out.pooled)
                    close(part.attended, out.attended)


@pytest.mark.parametrize("model", ["latents-softmax", "text-entmax15", "text-compete-sinks"])
def test_partial_request_computes_weights_of_the_asked_heads_only(model):
    """The rest go the way a forward without maps goes: fused SDPA for plain softmax, never kept."""
    query, kind, extra = PARTIAL_MODELS[model]
    fusion = make(query=query, attention=kind, **extra)
    calls = []
    for l, layer in enumerate(fusion.layers):
        def spy(*args, _l=l, _f=layer.attn.attend_heads, **kwargs):
            o, w, c = _f(*args, **kwargs)
            sel = args[5]
            heads = list(range(4))[sel] if isinstance(sel, slice) else list(sel)
            calls.append((_l, heads, w is not None))
            return o, w, c
        layer.attn.attend_heads = spy  # our own module's instance: counts the groups each layer attends
    inputs = [text_tokens(lengths=[6, 3]), image_tokens()]
    with torch.no_grad():
        fusion(inputs, return_maps=MapRequest(layers=(1,), heads=(2, 0)))
    kept = [(l, h) for l, h, keep in calls if keep]
    assert kept == [(1, [2, 0])]  # in the order asked
    assert sorted(h for l, heads, keep in calls if l == 0 for h in heads) == [0, 1, 2, 3]
    assert sorted(h for l, heads, keep in calls if l == 1 and not keep for h in heads) == [1, 3]
    if fusion.layers[0].attn.fused:  # the others are contiguous runs (views), fused
        assert [(l, h) for l, h, keep in calls if not keep] == [(0, [0, 1, 2, 3]), (1, [1]), (1, [3])]


@pytest.mark.parametrize("model", ["latents-softmax", "image-sparsemax", "text-compete-sinks"])
def test_partial_request_with_autograd_is_a_copy_as_when_cut(model):
    """With autograd recording, all heads' maps are the weights the output used (gradient relevance
    differentiates the score by them); a head subset comes back as the cut copy it always was, which
    no output depends on, so gradient relevance refuses it (test_relevance) instead of averaging a subset."""
    query, kind, extra = PARTIAL_MODELS[model]
    fusion = make(query=query, attention=kind, **extra)
    inputs = [text_tokens(lengths=[6, 3]), image_tokens()]
    full = fusion(inputs, return_maps=True)
    (g_full,) = torch.autograd.grad(full.pooled.square().sum(), full.maps.weights[1])
    assert g_full.abs().sum() > 0
    part = fusion(inputs, return_maps=MapRequest(layers=(1,), heads=(3, 1)))
    close(part.maps.weights[1], full.maps.weights[1][:, [3, 1]])
    assert part.maps.weights[1].requires_grad
    assert torch.autograd.grad(part.pooled.square().sum(), part.maps.weights[1], allow_unused=True) == (None,)


def test_partial_request_leaves_every_heads_output_as_without_maps():
    fusion = make(query="text")
    inputs = [text_tokens(lengths=[6, 3]), image_tokens(), audio_tokens()]
    per_head = []
    hooks = [layer.attn.out.register_forward_pre_hook(lambda mod, args: per_head.append(args[0].view(2, 6, 4, 8)))
             for layer in fusion.layers]  # (B, Nq, H, hd): each head's output before the output projection
    try:
        with torch.no_grad():
            fusion(inputs)
            fusion(inputs, return_maps=MapRequest(layers=(0, 1), heads=(1,)))
            fusion(inputs, return_maps=True)
    finally:
        for h in hooks:
            h.remove()
    plain, part, full = per_head[0:2], per_head[2:4], per_head[4:6]
    for l in range(2):
        close(part[l], plain[l])
        close(part[l], full[l])


def test_empty_head_request_keeps_empty_maps():
    fusion = make()
    out = fusion([text_tokens(), image_tokens()], return_maps=MapRequest(heads=()))
    assert out.maps.weights[0].shape == (2, 0, 5, 23)
    close(out.queries, fusion([text_tokens(), image_tokens()]).queries)


@pytest.mark.parametrize("kind", [{}, {"compete": True, "sinks": 2}, {"compete": True}, {"attention": "sparsemax"},
                                  {"attention": "entmax15"}, {"attention": "topk", "top_k": 3}],
                         ids=["softmax", "compete+sinks", "compete", "sparsemax", "entmax15", "topk"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
def test_several_captions_per_scene_equal_the_scene_repeated(kind, grad):
    """Query batch = G x key batch: each scene's keys projected once, its G captions attending as
    one set (competing within their own caption only) give what G copies of the scene give."""
    fusion = make(query="text", query_self_attention=True, **kind)
    G = 3
    text = text_tokens(B=2 * G, lengths=[6, 3, 5, 6, 2, 4])
    audio = audio_tokens()
    audio.mask[1, -4:] = False  # padded keys in the second scene
    scene = [image_tokens(), audio]
    request = MapRequest(heads=(3, 1))
    with torch.set_grad_enabled(grad):
        shared = fusion([text, *scene], return_maps=request)
        repeated = fusion([text, *(t.repeat(G) for t in scene)], return_maps=request)
    assert (shared.queries - repeated.queries).abs().max().item() <= 1e-5
    assert (shared.attended - repeated.attended).abs().max().item() <= 1e-5
    for l in range(2):
        assert shared.maps.weights[l].shape == (2 * G, 2, 6, 17 + 15)
        assert (shared.maps.weights[l] - repeated.maps.weights[l]).abs().max().item() <= 1e-6
    assert torch.equal(shared.maps.key_mask, repeated.maps.key_mask)
    assert torch.equal(shared.maps.key_special, repeated.maps.key_special)
    assert (shared.maps.claimed is None) == (repeated.maps.claimed is None) == (not kind.get("compete"))
    for l in shared.maps.claimed or {}:
        assert (shared.maps.claimed[l] - repeated.maps.claimed[l]).abs().max().item() <= 1e-6


def test_a_query_batch_that_is_not_a_multiple_of_the_scenes_is_refused():
    fusion = make(query="text")
    with pytest.raises(InputError, match=r"queries' batch \(5\) must be the keys' batch \(2\) or a multiple"):
        fusion([text_tokens(B=5), image_tokens(), audio_tokens()])
    with pytest.raises(InputError, match="all key modalities must have the same batch size"):
        fusion([text_tokens(B=2), image_tokens(B=2), audio_tokens(B=1)])


@pytest.mark.parametrize("attend", [sparsemax_attention, entmax15_attention], ids=["sparsemax", "entmax15"])
@pytest.mark.parametrize("k", [1, 3, 8, 40, 100])
def test_a_partial_sort_gives_the_full_sorts_values_and_gradients(attend, k):
    """Rows whose support fits in the k largest logits are done from them; the rest again in full."""
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(2, 3, 5, 40, generator=g) * torch.tensor([0.1, 1.0, 4.0])[None, :, None, None]
    logits[0, 0, 0] = 0.0  # a row of ties: every key in the support
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[1, ..., 30:] = False
    upstream = torch.randn(2, 3, 5, 40, generator=g)
    out = {}
    for kk in (0, k):
        z = logits.clone().requires_grad_(True)
        p = attend(z, mask, kk)
        p.backward(upstream)
        out[kk] = (p.detach(), z.grad)
    support = (out[0][0] > 0).sum(-1)
    if k < 40:  # the row of ties (support 40) is done again from the full sort
        assert bool((support >= k).any()) and bool((support < k).any()) == (k > 1)
    assert (out[k][0] - out[0][0]).abs().max().item() <= 1e-6
    assert (out[k][1] - out[0][1]).abs().max().item() <= 1e-6
    assert torch.all(out[k][0][1, ..., 30:] == 0)


def test_partial_sort_is_a_fusion_setting_that_changes_no_output():
    fusion = make(attention="entmax15")
    inputs = [text_tokens(lengths=[6, 3]), image_tokens(), audio_tokens()]
    fast = make(attention="entmax15", partial_sort=4)
    fast.load_state_dict(fusion.state_dict())
    with torch.no_grad():
        a, b = fusion(inputs, return_maps=True), fast(inputs, return_maps=True)
    assert (a.queries - b.queries).abs().max().item() <= 1e-5
    assert all((a.maps.weights[l] - b.maps.weights[l]).abs().max().item() <= 1e-6 for l in a.maps.weights)
    with pytest.raises(InputError, match="partial_sort"):
        FusionConfig(partial_sort=-1)


def test_competing_queries_report_their_claimed_share_of_the_keys():
    """Hand-computed: 2 queries, 3 keys, no sinks. Shares (softmax over queries per key) of query 0:
    key 0 e^2/(e^2+1), key 1 1/2, key 2 1/(1+e^2); its claim is their mean; the two claims sum to 1.
    Renormalised rows hide it: query 1's row peaks as sharply on key 2 as query 0's on key 0."""
    e2 = torch.exp(torch.tensor(2.0))
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])[None, None]  # (1, 1, 2, 3)
    mask = torch.ones(1, 1, 1, 3, dtype=torch.bool)
    qmask = torch.ones(1, 1, 2, 1, dtype=torch.bool)
    w, claimed = competitive_attention(z, mask, qmask, eps=0.0, claimed=True)
    want0 = (e2 / (e2 + 1) + 0.5 + 1 / (1 + e2)) / 3
    torch.testing.assert_close(claimed[0, 0], torch.stack([want0, 1 - want0]))
    assert torch.equal(w, competitive_attention(z, mask, qmask, eps=0.0))  # the weights are unchanged
    # a padded query claims nothing; a padded key counts for no one
    qmask[0, 0, 1, 0] = False
    mask[..., 2] = False
    _, claimed = competitive_attention(z, mask, qmask, eps=0.0, claimed=True)
    assert claimed[0, 0, 1] == 0 and torch.isclose(claimed[0, 0, 0], torch.tensor(1.0))


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
def test_maps_of_a_competing_block_carry_the_claims_and_they_sum_to_one_with_the_sinks(grad, tmp_path):
    fusion = make(query="text", compete=True, sinks=2)
    G = 2
    inputs = [text_tokens(B=2 * G, lengths=[6, 3, 5, 6]), image_tokens(), audio_tokens()]
    with torch.set_grad_enabled(grad):
        out = fusion(inputs, return_maps=MapRequest(heads=(3, 1)))
    c = out.maps.claimed
    assert set(c) == {0, 1} and c[0].shape == (2 * G, 2, 6)
    real = out.maps.query_mask[:, None, :]  # (B, 1, Nq)
    assert torch.all(c[1][~real.expand_as(c[1])] == 0) and torch.all((c[1] >= 0) & (c[1] <= 1))
    assert torch.all(c[1].sum(-1) < 1)  # the sinks took the rest
    saved = AttentionMaps.load(out.maps.save(tmp_path / "maps")[0])
    torch.testing.assert_close(saved.claimed[1], c[1].detach())
    assert make(query="text")(inputs, return_maps=True).maps.claimed is None  # no competition, no claims
