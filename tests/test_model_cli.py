"""The whole model (encoders + fusion + match head): checkpoints, and the `maps` command end to end."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from multimodal import FusionConfig, InputError
from multimodal.cli import main
from multimodal.encoders.text import phrase_member
from multimodal.fusion import MapRequest
from multimodal.inference import asset_path, load_inputs, load_model
from multimodal.model import (ORDER_BIAS_INIT, ORDER_SCALE_INIT, SOFTMIN_TEMPERATURE, MultimodalModel,
                              order_pairs)
from multimodal.types import AttentionMaps, AudioGeometry


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = FusionConfig(dim=64, heads=4, layers=2, query="text", query_self_attention=True)
    return MultimodalModel.from_specs(fusion=cfg, match="softmin").eval()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    img = np.full((96, 128, 3), 90, np.uint8)
    img[10:40, 10:40] = (220, 40, 40)
    Image.fromarray(img).save(d / "scene.png")
    t = np.arange(int(2.5 * 16000)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 800 * t) * ((t > 0.5) & (t < 1.0))
    sf.write(d / "scene.wav", np.stack([wave, wave], 1).astype(np.float32), 16000)  # stereo
    return d


def test_checkpoint_round_trip_gives_identical_scores(model, inputs, tmp_path):
    texts = ["a red square with a mid tone", "a blue circle"]
    images = [inputs / "scene.png"] * 2
    with torch.no_grad():
        before = model(text=texts, image=images).score
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    back = MultimodalModel.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        after = back(text=texts, image=images).score
    torch.testing.assert_close(before, after)
    assert back.match == "softmin" and back.cfg == model.cfg


@pytest.mark.parametrize("match", ["mean", "bilinear", "attended"])
def test_every_match_head_round_trips_and_ignores_padding(match, inputs, tmp_path):
    torch.manual_seed(1)
    m = MultimodalModel.from_specs(fusion=FusionConfig(dim=32, heads=2, layers=1, query="text"), match=match).eval()
    texts = ["a red square with a mid tone", "a blue circle"]
    with torch.no_grad():
        both = m(text=texts, image=[inputs / "scene.png"] * 2).score
        alone = m(text=texts[1:], image=[inputs / "scene.png"]).score
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)  # the longer caption pads the shorter
    assert both[0] != both[1]
    back = MultimodalModel.from_pretrained(m.save_pretrained(tmp_path / match))
    assert back.match == match
    with torch.no_grad():
        torch.testing.assert_close(back(text=texts, image=[inputs / "scene.png"] * 2).score, both)


def test_match_over_phrases_leaves_joining_words_out_of_the_soft_minimum(inputs, tmp_path):
    torch.manual_seed(2)
    m = MultimodalModel.from_specs(fusion=FusionConfig(dim=32, heads=2, layers=1, query="text"), match="attended",
                                   match_over="phrases", audio=None).eval()
    text = ["a red square and a blue circle with a mid tone then a low tone"]
    with torch.no_grad():
        tokens = m.encode(m.preprocess(text=text, image=[inputs / "scene.png"]))
        member = phrase_member(tokens["text"])[0]
        words = tokens["text"].geometry.tokens[0]
        assert [w for w, k in zip(words, member.tolist()) if not k] == ["[CLS]", "and", "with", "then", "[SEP]"]
        out = m.fuse(tokens)
        f = out.fused
        per_query = (m.match_asked(f.query_inputs) * m.match_gathered(f.attended)).sum(-1) / 32 ** 0.5 \
            + m.match_head[-1].bias  # (1, Nq)
        expected = -SOFTMIN_TEMPERATURE * torch.logsumexp(-per_query[0, member] / SOFTMIN_TEMPERATURE, 0)
        torch.testing.assert_close(out.score[0], expected)
        m.match_over = "content"  # the joining words count again: a different score
        assert (m.fuse(tokens).score[0] - expected).abs() > 1e-4
        m.match_over = "phrases"
        only_joining = m(text=["and then"], image=[inputs / "scene.png"]).score  # no phrase: its content counts
        assert torch.isfinite(only_joining).all()
    back = MultimodalModel.from_pretrained(m.save_pretrained(tmp_path / "phrases"))
    assert back.match_over == "phrases"
    config = json.loads((tmp_path / "phrases" / "config.json").read_text())
    config.pop("match_over")  # a checkpoint from before the option keeps its soft minimum over all content
    (tmp_path / "phrases" / "config.json").write_text(json.dumps(config))
    assert MultimodalModel.from_pretrained(tmp_path / "phrases").match_over == "content"
    with pytest.raises(InputError, match="match_over"):
        MultimodalModel.from_specs(fusion=FusionConfig(dim=32, heads=2, layers=1, query="text"), match_over="words")


def test_checkpoint_from_another_version_is_refused(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["format"] = "multimodal-sandbox-checkpoint/0"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="checkpoint format"):
        MultimodalModel.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(InputError, match="not a sandbox checkpoint"):
        MultimodalModel.from_pretrained(tmp_path)


def test_padding_in_a_batch_does_not_change_an_items_score(model):
    with torch.no_grad():
        alone = model(text=["a red square"], image=[np.zeros((64, 64, 3), np.uint8)]).score
        batched = model(text=["a red square", "a small blue circle with a high tone then a click train"],
                        image=[np.zeros((64, 64, 3), np.uint8)] * 2).score
    assert abs(alone[0].item() - batched[0].item()) < 1e-5


def test_model_errors_name_the_problem(model):
    with pytest.raises(InputError, match="give at least one input"):
        model()
    with pytest.raises(InputError, match="give a text input"):
        model(image=[np.zeros((64, 64, 3), np.uint8)])
    with pytest.raises(InputError, match="unknown image encoder spec 'no-such-vit'"):
        MultimodalModel.from_specs(image="no-such-vit")
    with pytest.raises(InputError, match="unknown modality"):
        MultimodalModel.from_specs(video="x")


def test_maps_command_writes_overlays_and_raw_maps(model, inputs, tmp_path, capsys):
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    rc = main(["maps", "--model", str(tmp_path / "ckpt"), "--image", str(inputs / "scene.png"),
               "--audio", str(inputs / "scene.wav"), "--text", "a red square with a mid tone",
               "--out", str(out), "--head", "0,2"])
    assert rc == 0
    for layer in (0, 1):
        for mod in ("image", "audio"):
            png = out / f"layer{layer}_{mod}.png"
            assert png.is_file() and Image.open(png).size[0] > 200
    maps = AttentionMaps.load(out / "maps")
    assert maps.heads == {0: [0, 2], 1: [0, 2]}
    assert set(maps.segments) == {"image", "audio"}  # text queries look at image and audio
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["match_score"] <= 1.0
    assert "layer1_audio.png" in capsys.readouterr().out


def test_maps_command_with_latent_queries_draws_text_too(inputs, tmp_path):
    out = tmp_path / "out"
    rc = main(["maps", "--text-encoder", "bert-tiny-scenes", "--image-encoder", "vit-tiny-scenes",
               "--audio-encoder", "ast-tiny-scenes", "--query", "latents", "--fusion-heads", "4",
               "--text", "a red square", "--image", str(inputs / "scene.png"), "--out", str(out),
               "--layers", "1"])
    assert rc == 0
    assert (out / "layer1_text.png").is_file() and (out / "layer1_image.png").is_file()
    html = (out / "layer1_text.html").read_text()
    assert "red" in html and "square" in html
    assert not (out / "layer0_image.png").exists()  # only the requested layer


def test_maps_command_bad_input_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    rc = main(["maps", "--text-encoder", "bert-tiny-scenes", "--image-encoder", "vit-tiny-scenes",
               "--image", str(bad), "--text", "a red square", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "error:" in capsys.readouterr().err


def test_the_command_line_loads_no_heavy_library_until_a_subcommand_needs_it():
    """`multimodal --help`, a subcommand's own help and a mistyped command answer without torch,
    transformers, timm or gradio; `train --help` lists the presets, so it loads the training code."""
    import subprocess
    import sys

    probe = ("import sys\nfrom multimodal.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'timm', 'gradio') if m in sys.modules)\n"
             "print('HEAVY', ','.join(heavy))\n")
    for argv, heavy in ((["--help"], ""), (["maps", "--help"], ""), (["mpas"], ""), (["eval", "--help"], ""),
                        (["train", "--help"], "timm,torch,transformers")):  # no gradio: the app is not training's
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=120)
        assert f"HEAVY {heavy}\n" in done.stdout, (argv, done.stdout[-300:], done.stderr[-300:])
        if argv == ["--help"]:
            assert all(c in done.stdout for c in ("maps", "demo", "scenes", "train", "eval", "compare"))
        if argv == ["train", "--help"]:
            from multimodal.train.config import PRESETS
            listed = " ".join(done.stdout.split())  # argparse wraps the help at the terminal's width
            assert "start from a preset: " + ", ".join(sorted(PRESETS)) in listed, listed
            assert {"default", "local", "smoke", "default-2026-12-03", "default-2026-12-07",
                    "default-2026-12-07-column"} <= set(PRESETS)
        if argv == ["mpas"]:
            assert "invalid choice: 'mpas'" in done.stderr


def test_the_package_names_its_api_without_importing_torch_first():
    import subprocess
    import sys

    code = ("import sys, multimodal\nassert 'torch' not in sys.modules\n"
            "from multimodal import CrossAttentionFusion, InputError, MapRequest\n"
            "assert 'torch' in sys.modules and CrossAttentionFusion.__module__ == 'multimodal.fusion'\n"
            "assert issubclass(InputError, ValueError) and 'MapRequest' in dir(multimodal)\n"
            "try:\n    multimodal.nothing_here\nexcept AttributeError as e:\n    print('OK', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "OK module 'multimodal' has no attribute 'nothing_here'" in done.stdout, done.stderr


def test_words_the_model_never_saw_are_named_with_its_vocabulary(tmp_path, capsys):
    """The embedded default was trained on scene captions: 'cat' and 'tabby' are new to it, 'red' is not.
    A model built from specs has no training record: no notice. A trained checkpoint records its words."""
    from multimodal.data.scenes import caption_words
    from multimodal.inference import ASSETS, known_words, load_model, vocabulary_notice
    from multimodal.train import load_config, train

    default, _ = load_model()
    assert known_words(default) == caption_words() and "circle" in caption_words()
    notice = vocabulary_notice(default, "A tabby cat, and a RED circle!")
    assert notice.startswith("2 words of the caption are new to this model: 'tabby', 'cat'.")
    assert "trained on captions of 29 words only" in notice and "Its words: a and blue burst" in notice
    assert vocabulary_notice(default, "a red circle then a rising chirp") is None
    assert vocabulary_notice(MultimodalModel.from_specs(), "a tabby cat") is None

    assert main(["maps", "--image", str(ASSETS / "sample.png"), "--text", "a tabby cat", "--out",
                 str(tmp_path / "maps")]) == 0
    err = capsys.readouterr().err
    assert "note: 2 words of the caption are new to this model: 'tabby', 'cat'" in err
    assert "new to this model" in json.loads((tmp_path / "maps" / "summary.json").read_text())["notices"][0]

    run = tmp_path / "run"
    train(load_config("smoke", overrides={"steps": 1}), run, progress=False)
    assert MultimodalModel.from_pretrained(run).meta["caption_words"] == caption_words()


def test_embedded_models_load_by_name(model, inputs, tmp_path, monkeypatch, capsys):
    """`--model local` (or any name in inference.EMBEDDED) loads the bundled checkpoint of that name; a
    folder of that name in the working directory wins; a name this installation lacks says which it has."""
    from multimodal import inference
    from multimodal.app.session import model_choices

    folder = tmp_path / "bundled_local"
    model.save_pretrained(folder)
    monkeypatch.setitem(inference.EMBEDDED, "local", folder)
    loaded, source = inference.load_model("local")
    assert source == folder and torch.equal(next(iter(loaded.state_dict().values())),
                                            next(iter(model.state_dict().values())))
    assert "the embedded model `local`" in inference.describe_model(loaded, source)
    assert model_choices(None)["local"] == folder
    assert main(["maps", "--model", "local", "--image", str(inputs / "scene.png"), "--text", "a red square",
                 "--out", str(tmp_path / "maps")]) == 0
    monkeypatch.chdir(tmp_path)
    model.save_pretrained(tmp_path / "local")  # a folder named like the embedded model: the folder is meant
    assert inference.checkpoint_dir("local").resolve() == tmp_path / "local"
    monkeypatch.setitem(inference.EMBEDDED, "local", tmp_path / "missing")
    (tmp_path / "local").rename(tmp_path / "elsewhere")
    with pytest.raises(InputError, match="the embedded model 'local' is not in this installation"):
        inference.load_model("local")


# ---------------------------------------------------------------------------------------
# match_order: "<phrase> then <phrase>" read off where each phrase's audio attention is centred
# ---------------------------------------------------------------------------------------


def audio_maps_for(weights, times):
    """AttentionMaps over audio keys only: one freq band per time column; `weights` (B, h, Nq, T) for layer 0."""
    B, _, Nq, T = weights.shape
    geom = AudioGeometry(times=list(times), freq_bins=1, sample_rate=16000, durations=[times[-1] + 0.5] * B)
    return AttentionMaps(weights={0: weights}, heads={0: list(range(weights.shape[1]))}, segments={"audio": (0, T)},
                         key_mask=torch.ones(B, T, dtype=torch.bool), key_special=torch.zeros(B, T, dtype=torch.bool),
                         query_source="text", query_mask=torch.ones(B, Nq, dtype=torch.bool),
                         key_geometry={"audio": geom}, num_heads=weights.shape[1])


def order_model(**kw):
    torch.manual_seed(3)
    return MultimodalModel.from_specs(fusion=FusionConfig(dim=32, heads=2, layers=1, query="text"),
                                      match="attended", match_order=True, image=None, **kw).eval()


def test_order_pairs_event_times_and_items_match_hand_computed_values():
    m = order_model()
    text = m.encoders["text"].encode(["a chirp then a burst then a click", "a red circle with a tone", "then a tone"])
    assert text.geometry.tokens[0][:8] == ["[CLS]", "a", "chirp", "then", "a", "burst", "then", "a"]
    before, after = order_pairs(text)
    assert before.shape[:2] == (3, 2)
    assert before[0, 0, 1:3].tolist() == [0.5, 0.5] and after[0, 0, 4:6].tolist() == [0.5, 0.5]
    assert before[0, 1, 4:6].tolist() == [0.5, 0.5] and after[0, 1, 7:9].tolist() == [0.5, 0.5]
    assert before[0].sum().item() == 2 and before[1].sum() == 0 and before[2].sum() == 0  # no phrase before "then"
    # each query's time: the mass-weighted mean column time over every head's audio weights
    w = torch.zeros(1, 2, 2, 3)
    w[0, 0, 0] = torch.tensor([0.6, 0.0, 0.0])
    w[0, 1, 0] = torch.tensor([0.0, 0.2, 0.0])  # a head that hardly looks at the audio counts for little
    w[0, 0, 1] = torch.tensor([0.0, 0.0, 1.0])
    w[0, 1, 1] = torch.tensor([0.0, 1.0, 0.0])
    t = m.event_times(audio_maps_for(w, [0.5, 1.5, 2.5]))
    torch.testing.assert_close(t, torch.tensor([[(0.6 * 0.5 + 0.2 * 1.5) / 0.8, 2.0]]))
    removed = m.event_times(audio_maps_for(w, [0.5, 1.5, 2.5]), head_mask=torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(removed, torch.tensor([[1.5, 1.5]]))  # a head the mask removes does not count
    # an item per pair: softplus(scale) * (t_after - t_before) + bias, NaN past a caption's pairs
    times = torch.zeros(3, text.tokens.shape[1])
    times[0, 1:3], times[0, 4:6], times[0, 7:9] = 0.5, 2.0, 1.0
    m.event_times = lambda maps, head_mask=None: times
    items = m.order_items(text, None)
    scale, bias = ORDER_SCALE_INIT, ORDER_BIAS_INIT
    torch.testing.assert_close(items[0], torch.tensor([scale * 1.5 + bias, scale * -1.0 + bias]))
    assert items[1:].isnan().all()


def test_match_order_joins_the_soft_minimum_and_leaves_maps_as_asked(inputs, tmp_path):
    m = order_model()
    texts = ["a mid tone then a low tone", "a low tone then a mid tone", "a mid tone"]
    with torch.no_grad():
        tokens = m.encode(m.preprocess(text=texts, audio=[inputs / "scene.wav"] * 3))
        out = m.fuse(tokens)
        assert out.maps is None  # computed for the order items, not returned when not asked for
        full = m.fuse(tokens, return_maps=True)
        some = m.fuse(tokens, return_maps=MapRequest(layers=(0,), heads=(1,)))
        torch.testing.assert_close(full.score, out.score)
        torch.testing.assert_close(some.score, out.score)  # the score does not depend on the maps asked for
        assert some.maps.heads == {0: [1]} and torch.equal(some.maps.weights[0], full.maps.weights[0][:, [1]])
        items = m.order_items(tokens["text"], full.maps)  # (3, 1)
        f = out.fused
        per_query = (m.match_asked(f.query_inputs) * m.match_gathered(f.attended)).sum(-1) / 32 ** 0.5 \
            + m.match_head[-1].bias
        content = tokens["text"].mask & ~tokens["text"].special
        for b in range(3):
            terms = per_query[b, content[b]]
            if not items[b].isnan().all():
                terms = torch.cat([terms, items[b]])
            expected = -SOFTMIN_TEMPERATURE * torch.logsumexp(-terms / SOFTMIN_TEMPERATURE, 0)
            torch.testing.assert_close(out.score[b], expected)
        plain = MultimodalModel(dict(m.encoders), m.cfg, match="attended")
        plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("order_")})
        torch.testing.assert_close(plain.eval().fuse(tokens).score[2], out.score[2])  # no "then": no item
    with torch.enable_grad():  # the returned maps are the tensors the score used: gradient relevance works
        out = m.fuse(tokens, return_maps=True)
        grads = torch.autograd.grad(out.score.sum(), [out.maps.weights[0]])
        assert grads[0].abs().sum() > 0
    back = MultimodalModel.from_pretrained(m.save_pretrained(tmp_path / "order"))
    assert back.match_order and back.order_bias.item() == ORDER_BIAS_INIT
    with torch.no_grad():
        torch.testing.assert_close(back(text=texts, audio=[inputs / "scene.wav"] * 3).score, out.score)
    config = json.loads((tmp_path / "order" / "config.json").read_text())
    assert config["match_order"] is True
    with pytest.raises(InputError, match="match_order"):
        MultimodalModel.from_specs(fusion=FusionConfig(dim=32, heads=2, layers=1, query="text"), match="mean",
                                   match_order=True)


def test_match_order_on_the_shipped_default_rejects_the_sample_with_its_events_swapped():
    """The default reads event order off its own maps, trained with it from step 0 (scale and bias
    learned): the sample's caption is a match, the same caption with its two events swapped is not, and
    the order item alone makes the difference there (without it the swapped caption scores higher)."""
    m = load_model("default")[0]
    assert m.match_order and m.order_bias.item() != ORDER_BIAS_INIT  # learned, not the initial value
    blind = MultimodalModel(dict(m.encoders), m.cfg, match=m.match, match_over=m.match_over).eval()
    blind.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("order_")})
    caption = (asset_path("sample.txt")).read_text().strip()
    assert "a falling chirp then a rising chirp" in caption
    swapped = caption.replace("a falling chirp then a rising chirp", "a rising chirp then a falling chirp")
    given = load_inputs(image=asset_path("sample.png"), audio=asset_path("sample.wav"), text=caption)
    with torch.no_grad():
        tokens = m.encode(m.preprocess(text=[caption, swapped], image=[given.image] * 2, audio=[given.audio] * 2))
        with_order, without = m.fuse(tokens).score, blind.fuse(tokens).score
        times = m.event_times(m.fuse(tokens, return_maps=True).maps)[0]
    before, after = order_pairs(tokens["text"])
    falling, rising = (before[0, 0] * times).sum().item(), (after[0, 0] * times).sum().item()
    assert rising - falling > 0.5  # seconds: the sample's falling chirp comes first
    assert with_order[0] > 0 and with_order[1] < 0  # the true order: a match; swapped: no match
    assert with_order[1] < without[1]  # the order item is the swapped caption's lowest term
