"""The Gradio app: plain handler functions without a server, then the real server via gradio_client.

The server tests start `multimodal.app`'s Blocks on a free local port around a small random
checkpoint (the embedded default may not exist yet) and synthetic sample files.
"""

import json
import math
import socket
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import gradio as gr
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import multimodal.app as A
from multimodal import FusionConfig, InputError, inference
from multimodal.data.scenes import generate_scene, save_scene
from multimodal.model import MultimodalModel
from multimodal.types import ModalityTokens

def load_app_inputs(image=None, audio=None, text=None):
    """What the app's handler does first: the package's one input boundary under the app's limits."""
    return inference.load_inputs(image, audio, text, A.APP_LIMITS)


CAPTION = "a red square and a high tone"
SR = 16_000


def write_scene(folder: Path, stem: str = "scene") -> dict[str, Path]:
    """A sample like the bundled ones: image, 4 s clip, caption and ground truth."""
    img = np.full((192, 256, 3), 90, np.uint8)
    img[40:100, 40:100] = (220, 40, 40)
    Image.fromarray(img).save(folder / f"{stem}.png")
    t = np.arange(4 * SR) / SR
    wave = (0.3 * np.sin(2 * np.pi * 1200 * t) * ((t > 1.0) & (t < 2.0))).astype(np.float32)
    sf.write(folder / f"{stem}.wav", wave, SR)
    (folder / f"{stem}.txt").write_text(CAPTION)
    gt = {"caption": CAPTION,
          "phrases": [{"span": [2, 12], "target": "object", "index": 0},
                      {"span": [17, 28], "target": "event", "index": 0}],
          "objects": [{"box": [40, 40, 100, 100]}], "events": [{"start": 1.0, "end": 2.0}]}
    (folder / f"{stem}.json").write_text(json.dumps(gt))
    return {k: folder / f"{stem}.{ext}" for k, ext in
            (("image", "png"), ("audio", "wav"), ("caption", "txt"), ("gt", "json"))}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("app-inputs")
    examples = d / "examples"  # like assets/: a scene written by the scene generator
    scene = save_scene(generate_scene(3), examples, "scene")
    f = {f"example_{k}": str(v) for k, v in scene.items()}
    f.update({k: str(v) for k, v in write_scene(d).items()})  # the simple documented format
    bad = d / "bad"
    bad.mkdir()
    rng = np.random.default_rng(0)
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(300))
    (bad / "empty.wav").write_bytes(b"")
    sf.write(bad / "no_samples.wav", np.zeros(0, np.float32), SR)
    sf.write(bad / "silent.wav", np.zeros(2 * SR, np.float32), SR)
    sf.write(bad / "long.wav", (0.1 * rng.standard_normal(40 * SR)).astype(np.float32), SR)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(bad / "tiny.png")
    Image.new("L", (10_000, 5_000)).save(bad / "bomb.png")  # 50 M pixels, ~50 kB on disk
    rgba = np.zeros((64, 80, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(bad / "rgba.png")
    Image.fromarray((np.arange(64 * 80).reshape(64, 80) * 12).astype(np.uint16)).save(bad / "gray16.png")
    assert Image.open(bad / "gray16.png").mode.startswith("I")
    Image.new("CMYK", (80, 64), (0, 200, 200, 0)).save(bad / "cmyk.jpg")
    (bad / "broken.json").write_text("{not json")
    (bad / "truth.txt").write_text("{}")
    (bad / "huge.png").write_bytes(b"\0" * ((A.MAX_UPLOAD_MB + 1) * 1024 * 1024))
    f.update({p.stem: str(p) for p in bad.iterdir()})
    f["examples_dir"] = str(examples)
    return f


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = FusionConfig(dim=64, heads=4, layers=2, query="text", query_self_attention=True)
    return MultimodalModel.from_specs(fusion=cfg, match="softmin").save_pretrained(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def app(checkpoint, files):
    return A.App(MultimodalModel.from_pretrained(checkpoint), checkpoint, examples_dir=files["examples_dir"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app):
    demo = A.build_demo(app)
    kwargs = A.launch_kwargs("127.0.0.1", free_port())
    demo.launch(prevent_thread_lock=True, **kwargs)
    yield demo, f"http://127.0.0.1:{kwargs['server_port']}"
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server[1], verbose=False, download_files=False)


def run(client, image=None, audio=None, text=CAPTION, gt=None, ablate=(), layer=0, token=A.MEAN_TOKEN):
    up = lambda p: handle_file(p) if p else None  # noqa: E731
    return client.predict(up(image), up(audio), text, up(gt), list(ablate), layer, token, api_name="/run")


def probability(label: dict) -> float:
    return next(c["confidence"] for c in label["confidences"] if c["label"] == "match")


def value(update):
    """The value of a component update; files come back as their server path (download_files=False)."""
    v = update["value"] if isinstance(update, dict) and "value" in update else update
    return v["path"] if isinstance(v, dict) and "path" in v else v


# ---------------------------------------------------------------------------------------
# Plain functions, no server
# ---------------------------------------------------------------------------------------


def test_odd_image_modes_are_converted_not_refused(files):
    for name in ("rgba", "gray16", "cmyk"):
        img = load_app_inputs(image=files[name]).image
        assert img.mode == "RGB" and min(img.size) >= 8, name


def test_inputs_are_validated_with_readable_messages(files):
    cases = {
        "corrupt": ({"image": files["corrupt"]}, "not an image"),
        "tiny": ({"image": files["tiny"]}, "1x1 pixels"),
        "bomb": ({"image": files["bomb"]}, "too large"),
        "wav as image": ({"image": files["audio"]}, "not an image"),
        "empty audio": ({"audio": files["empty"]}, "could not be read as audio"),
        "no samples": ({"audio": files["no_samples"]}, "no samples"),
        "png as audio": ({"audio": files["image"]}, "could not be read as audio"),
        "long text": ({"text": "red " * 200}, "limit of 500"),
    }
    for name, (kw, message) in cases.items():
        with pytest.raises(InputError, match=message):
            load_app_inputs(**kw)
    assert load_app_inputs(text="   ").text is None


def test_silent_and_long_audio_run_with_a_notice(files):
    silent = load_app_inputs(audio=files["silent"])
    assert any("silent" in n for n in silent.notices)
    long = load_app_inputs(audio=files["long"])
    assert long.audio.duration == pytest.approx(A.MAX_AUDIO_SECONDS)
    assert any("first 30 s" in n for n in long.notices)


def test_subset_rules_name_what_is_missing():
    mods = ["text", "image", "audio"]
    with pytest.raises(InputError, match="give a caption as well as an image or an audio clip"):
        inference.check_subset("text", mods, ["image"])
    with pytest.raises(InputError, match="need something to attend to"):
        inference.check_subset("text", mods, ["text"])
    assert inference.check_subset("text", mods, ["text", "audio"]) == []
    assert inference.check_subset("latents", mods, ["audio"]) == []
    with pytest.raises(InputError, match="at least one input"):
        inference.check_subset("latents", mods, [])
    assert "no audio encoder" in inference.check_subset("text", ["text", "image"], ["text", "image", "audio"])[0]


def test_head_mask_and_query_choices():
    mask = A.head_mask_from(["L0 H2", "L1 H0"], 2, 4)
    assert mask.tolist() == [[1, 1, 0, 1], [0, 1, 1, 1]]
    assert A.head_mask_from([], 2, 4) is None
    with pytest.raises(InputError, match="unknown head"):
        A.head_mask_from(["L5 H0"], 2, 4)
    assert A.parse_query(A.MEAN_TOKEN, [1, 2]) is None
    assert A.parse_query("2: red", [1, 2]) == 2
    with pytest.raises(InputError):
        A.parse_query("9: nope", [1, 2])


def test_examples_are_found_by_stem_and_missing_assets_give_none(files, tmp_path):
    rows = A.find_examples(files["examples_dir"])
    caption = json.loads(Path(files["example_json"]).read_text())["caption"]
    assert rows == [[files["example_image"], files["example_audio"], caption, files["example_json"]]]
    assert A.find_examples(tmp_path / "nowhere") == []
    assert A.find_examples(tmp_path) == []


def test_ground_truth_format_errors_are_readable(files, tmp_path):
    gt = A.load_ground_truth(files["gt"])
    assert gt.phrases[0]["span"] == (2, 12) and gt.events == [(1.0, 2.0)] and "box" in gt.objects[0]
    sent_back = tmp_path / "scene.json"  # what the page hands over: a copy, without the label PNG beside it
    sent_back.write_bytes(Path(files["example_json"]).read_bytes())
    assert "box" in A.load_ground_truth(sent_back).objects[0]
    scene = A.load_ground_truth(sent_back, [files["examples_dir"]])
    assert scene.objects[0]["mask"].shape == (128, 128) and scene.objects[0]["mask"].any()
    with pytest.raises(InputError, match="not readable JSON"):
        A.load_ground_truth(files["broken"])
    (tmp_path / "bad.json").write_text(json.dumps({"phrases": [{"span": [0, 3], "target": "object", "index": 4}]}))
    with pytest.raises(InputError, match="points at object 4"):
        A.load_ground_truth(tmp_path / "bad.json")


def test_status_says_what_event_order_the_maps_read():
    """The default reads event order off its maps: the status names each '<phrase> then <phrase>', where
    each is centred and whether they are in order; with the sample's events swapped, out of order."""
    from multimodal.inference import ASSETS, load_model

    app = A.App(*load_model(), examples_dir=None)
    image, audio = str(ASSETS / "sample.png"), str(ASSETS / "sample.wav")
    caption = (ASSETS / "sample.txt").read_text().strip()
    status, score = app.run(image, audio, caption)[:2]
    assert "Event order, read off the audio maps: 'a falling chirp' centred at " in status
    assert ": in order (term +" in status and score["match"] > 0.5
    swapped = caption.replace("a falling chirp then a rising chirp", "a rising chirp then a falling chirp")
    status, score = app.run(image, audio, swapped)[:2]
    assert "then 'a falling chirp' at 0." in status and "out of order" in status and score["match"] < 0.5  # it is heard at 0.23-0.79 s
    repeated = caption.replace("a falling chirp then a rising chirp", "a falling chirp then a falling chirp")
    status, score = app.run(image, audio, repeated)[:2]  # one falling chirp is heard: trained to say no match
    assert "'a falling chirp' centred at " in status and "then 'a falling chirp' at " in status and score["match"] < 0.5
    assert "Event order" not in app.run(image, audio, "a small white square")[0]  # no "then": nothing to read


def test_event_order_lines_say_when_two_phrases_are_centred_too_close_to_order():
    from multimodal.inference import SAME_TIME_S, describe_event_order

    assert describe_event_order([]) is None
    pairs = [{"first": "a low tone", "first_s": 0.5, "then": "a chirp", "then_s": 2.0, "term": 8.1},
             {"first": "a chirp", "first_s": 2.0, "then": "a low tone", "then_s": 0.5, "term": -4.6},
             {"first": "a chirp", "first_s": 1.0, "then": "a chirp", "then_s": 1.0 + SAME_TIME_S / 2, "term": 2.3}]
    lines = describe_event_order(pairs)
    assert lines.startswith("Event order, read off the audio maps: 'a low tone' centred at 0.50 s, then 'a chirp' "
                            "at 2.00 s: in order (term +8.10); 'a chirp' centred at 2.00 s, then 'a low tone' at "
                            "0.50 s: out of order, which alone makes this caption no match (term -4.60); ")
    assert lines.endswith(f"at 1.12 s: within {SAME_TIME_S:g} s of each other, so the maps hardly tell them apart "
                          "in time (a repeated event reads so too) (term +2.30).")


def test_run_handler_without_a_server(app, files):
    out = app.run(files["image"], files["audio"], CAPTION, files["gt"], [], 0, None)
    status, score, image_grid, audio_grid, text_grid, playback, markup, table, downloads, token, res = out
    assert status.startswith("Ran on") and 0.0 < score["match"] < 1.0
    assert Path(image_grid.value["path"]).name == "layer0_image.png"
    assert Path(text_grid.value["path"]).name == "layer0_text_concentration.png" and "concentrated" in markup.value
    assert len(table) == 2 * 4 and {"entropy", "confidence", "share image", "share audio",
                                    "pointing image", "energy in object", "mass in event"} <= set(table.columns)
    assert ((table["entropy"] >= 0) & (table["entropy"] <= 1)).all()
    assert [Path(p).name for p in downloads] == ["maps.zip"]
    names = set(zipfile.ZipFile(downloads[0]).namelist())
    assert {"maps.npz", "maps.json", "layer1_audio.png", "layer0_text_concentration.png", "metrics.csv",
            "summary.json"} <= names
    assert "2: red" in token.choices[2]
    view = app.view(res, 1, "2: red")
    assert Path(view[0].value["path"]).name == "layer1_image.png"
    with pytest.raises(gr.Error, match="run the model first"):
        app.view(None, 0, None)


def test_model_description_warns_about_random_weights(checkpoint):
    model = MultimodalModel.from_pretrained(checkpoint)
    assert "random weights" in inference.describe_model(model, None)
    assert "no training record" in inference.describe_model(model, checkpoint)
    model.meta["step"] = 3000
    assert "trained for 3000 steps" in inference.describe_model(model, checkpoint)


def test_default_model_is_used_when_present_and_nothing_is_named(checkpoint, monkeypatch, tmp_path):
    monkeypatch.setattr(inference, "DEFAULT_CHECKPOINT", Path(checkpoint))
    model, source = inference.load_model()
    assert source == Path(checkpoint) and model.cfg.heads == 4
    monkeypatch.setattr(inference, "DEFAULT_CHECKPOINT", tmp_path / "absent")
    model, source = inference.load_model(fusion={"dim": 32, "heads": 2, "layers": 1, "query": "text"})
    assert source is None and model.cfg.heads == 2


def test_cli_demo_defaults_are_local_and_private():
    from multimodal.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.host == "127.0.0.1" and args.share is False and args.model is None
    kw = A.launch_kwargs()
    assert kw["server_name"] == "127.0.0.1" and kw["share"] is False
    assert kw["max_file_size"] == f"{A.MAX_UPLOAD_MB}mb"


# ---------------------------------------------------------------------------------------
# The real server
# ---------------------------------------------------------------------------------------


def test_example_round_trip(client, app, files):
    image, audio, caption, gt = app.examples[0]
    out = run(client, image, audio, caption, gt)
    status, label, image_grid, audio_grid, text_grid, playback, markup, table, downloads, token = out
    assert status.startswith("Ran on") and "Note" not in status
    assert value(image_grid).endswith("layer0_image.png") and value(audio_grid).endswith("layer0_audio.png")
    assert value(text_grid).endswith("layer0_text_concentration.png") and value(playback).endswith(".wav")
    assert "mm-tok" in value(markup)
    assert {"pointing image", "energy in object", "mass in event", "pointing audio"} <= set(table["headers"])
    assert len(table["data"]) == 8
    (bundle,) = [value(p) for p in downloads]  # the server's copy: this test runs on the same machine
    with zipfile.ZipFile(bundle) as z:
        assert {"maps.npz", "maps.json", "metrics.csv", "layer1_image.png"} <= set(z.namelist())
        meta = json.loads(z.read("maps.json"))
    assert meta["layers"] == [0, 1] and meta["query_source"] == "text"
    choices = [c[0] for c in token["choices"]]
    words = caption.split()
    assert choices[0] == A.MEAN_TOKEN and choices[1:3] == [f"1: {words[0]}", f"2: {words[1]}"]
    view = client.predict(1, choices[2], api_name="/view")
    assert value(view[0]).endswith("layer1_image.png")
    tokens = client.predict("a blue circle", api_name="/tokens")
    assert [c[0] for c in tokens["choices"]] == [A.MEAN_TOKEN, "1: a", "2: blue", "3: circle"]


BAD = [  # (image, audio, text, gt) keys into `files` or literal text -> words in the message
    ("corrupt", None, CAPTION, None, "not an image"),
    ("audio", None, CAPTION, None, "not an image"),  # a WAV as the image
    ("image", "image", CAPTION, None, "could not be read as audio"),  # a PNG as the audio
    ("image", "empty", CAPTION, None, "could not be read as audio"),
    ("image", "no_samples", CAPTION, None, "no samples"),
    ("tiny", None, CAPTION, None, "1x1 pixels"),
    ("bomb", None, CAPTION, None, "too large"),
    ("image", None, "\U0001F600\U0001F680", None, "no recognisable words"),
    ("image", None, "red " * 200, None, "above the demo's limit"),
    ("image", None, "", None, "give a caption"),
    (None, None, CAPTION, None, "need something to attend to"),
    (None, None, "", None, "give a caption"),
    ("image", None, CAPTION, "broken", "not readable JSON"),
    ("image", None, CAPTION, "truth", "Invalid file type"),
]


@pytest.mark.parametrize("image,audio,text,gt,message", BAD, ids=[b[-1][:24] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_get_a_readable_message_and_the_server_stays_up(client, files, image, audio, text, gt, message):
    with pytest.raises(AppError) as err:
        run(client, files.get(image), files.get(audio), text, files.get(gt))
    assert message.lower() in str(err.value).lower(), str(err.value)
    assert run(client, files["image"], None, CAPTION)[0].startswith("Ran on")


def test_uploads_above_the_size_limit_are_refused_by_the_server(server, client, files):
    import httpx

    assert client.config["max_file_size"] == A.MAX_UPLOAD_MB * 1024 * 1024
    with open(files["huge"], "rb") as f:
        r = httpx.post(client.upload_url, files=[("files", ("huge.png", f))], timeout=60)
    assert r.status_code == 413 and "maximum allowed size" in r.text
    assert run(client, files["image"], None, CAPTION)[0].startswith("Ran on")


def test_odd_images_work_and_silent_or_long_audio_run_with_a_visible_notice(client, files):
    for name in ("rgba", "gray16", "cmyk"):
        assert run(client, files[name], None, CAPTION)[0].startswith("Ran on"), name
    status = run(client, files["image"], files["silent"], CAPTION)[0]
    assert "silent" in status and "not meaningful" in status
    status = run(client, None, files["long"], CAPTION)[0]
    assert "first 30 s" in status and "30.0 s of audio" in status


def test_sixty_concurrent_requests_are_all_answered_and_none_mixed_up(client, app, files):
    captions = [CAPTION, "a blue circle", "a rising chirp", "a small green star and a click train"]
    expected = {}
    for c in captions:
        with torch.inference_mode():
            out = app.model(text=[c], image=[files["image"]], audio=[files["audio"]])
        expected[c] = float(torch.sigmoid(out.score[0]))
    jobs = [captions[i % len(captions)] for i in range(60)]  # the queue holds 64: none is turned away
    with ThreadPoolExecutor(max_workers=60) as pool:
        results = list(pool.map(lambda c: run(client, files["image"], files["audio"], c), jobs))
    for c, r in zip(jobs, results):
        assert r[0].startswith("Ran on") and f"a caption of {len(c)} characters" in r[0]
        assert probability(r[1]) == pytest.approx(expected[c], abs=1e-4)
        assert [ch[0] for ch in r[9]["choices"]][1:] == [f"{i + 1}: {w}" for i, w in enumerate(c.split())]


def test_ablation_changes_the_score_and_the_maps(client, files):
    base = run(client, files["image"], files["audio"], CAPTION)
    off = run(client, files["image"], files["audio"], CAPTION, ablate=["L0 H0", "L0 H1", "L1 H2"])
    assert abs(probability(base[1]) - probability(off[1])) > 1e-4
    assert "Heads switched off: L0 H0, L0 H1, L1 H2" in off[0]
    heads = [r[0] for r in off[7]["data"]]
    assert heads == ["L0 H0 (off)", "L0 H1 (off)", "L0 H2", "L0 H3", "L1 H0", "L1 H1", "L1 H2 (off)", "L1 H3"]
    layer1 = lambda t: [r[1:] for r in t["data"] if r[0].startswith("L1")]  # noqa: E731  layer-1 heads' metrics
    assert layer1(base[7]) != layer1(off[7])  # layer 1 sees a different input once layer-0 heads are off


def test_a_caption_with_words_the_default_never_saw_runs_with_a_notice_naming_them(files):
    from multimodal.inference import load_model

    default, source = load_model()
    status = A.App(default, source, examples_dir=None).run(files["image"], None, "a cat and a red circle")[0]
    assert status.startswith("Ran on") and "**Note:** 1 word of the caption is new to this model: 'cat'" in status
    assert "Its words: a and blue" in status


def test_competing_queries_show_their_claimed_share_in_the_table_and_the_head_labels(files, monkeypatch):
    """The default's phrase queries compete for keys: the table reads each head's mean claim over the
    caption's queries, and every grid label names the claim of the queries drawn (here one token's)."""
    import multimodal.drawing as drawing
    from multimodal.inference import load_model

    default, source = load_model()
    app = A.App(default, source, examples_dir=None)
    out = app.run(files["image"], files["audio"], "a red circle then a rising chirp")
    table, res = out[7], out[-1]
    claims = res.maps.claimed[0][0]  # (h, Nq)
    content = res.maps.content_queries()[0]
    per_layer = [res.maps.claimed[layer][0][:, content].mean(-1) for layer in res.maps.layers]  # rows: L0 H0, ...
    np.testing.assert_allclose(table["claimed share"].to_numpy(), torch.cat(per_layer).numpy(), atol=5e-4)
    # shares of the keys, not all or nothing, and shown as such: a head whose queries leave nearly every key to
    # the background queries keeps its first digits in the table, not 0.000
    assert ((torch.cat(per_layer) > 0) & (torch.cat(per_layer) < 1)).all()
    assert ((table["claimed share"] > 0) & (table["claimed share"] < 1)).all()
    seen = []
    real = drawing.image_head_grid
    monkeypatch.setattr(drawing, "image_head_grid", lambda *a, **k: seen.append(k["labels"]) or real(*a, **k))
    query = int(torch.nonzero(content)[0])
    drawing.render_layer(res.maps, 0, image=res.image, query=query)
    assert seen[-1] == [f"L0 H{h}, claims {c:.0%}" for h, c in enumerate(claims[:, query].tolist())]


def test_encoder_heads_are_drawn_on_the_last_inputs_through_the_server(client, app, files):
    """/encoders after /run: every encoder of the test model has 2 layers: 2 layer grids + 1 rollout each."""
    with pytest.raises(AppError, match="run the model first"):
        Client(client.src, verbose=False, download_files=False).predict("cls", api_name="/encoders")
    image, audio, caption, gt = app.examples[0]
    run(client, image, audio, caption, gt)
    gallery, note = client.predict("mean", api_name="/encoders")
    names = [Path(value(item["image"])).name for item in gallery]
    assert names == [f"encoder_{m}_{k}.png" for m in ("text", "image", "audio") for k in ("layer0", "layer1", "rollout")]
    assert [item["caption"] for item in gallery][:3] == ["text layer0", "text layer1", "text rollout"]
    assert "as the mean over its content tokens" in note and "no self-attention layers" not in note
    assert all(Image.open(value(item["image"])).size[0] > 100 for item in gallery)


def test_the_readme_api_snippet_runs_against_a_live_server_of_the_default_model(tmp_path, monkeypatch, capsys):
    """The README's gradio_client block, as written, against the embedded default served here."""
    import re

    from multimodal.inference import ASSETS, load_model

    block = re.search(r"```python\n(from gradio_client import Client, handle_file\n.*?)```",
                      (Path(__file__).resolve().parents[1] / "README.md").read_text(), re.S).group(1)
    demo = A.build_demo(A.App(*load_model()))
    kwargs = A.launch_kwargs("127.0.0.1", free_port())
    demo.launch(prevent_thread_lock=True, **kwargs)
    try:
        monkeypatch.chdir(ASSETS.parent)  # the snippet names assets/... from the repository root
        code = block.replace("http://127.0.0.1:7860/", f"http://127.0.0.1:{kwargs['server_port']}/")
        exec(compile(code, "README.md", "exec"), {})
    finally:
        demo.close()
    printed = capsys.readouterr().out
    assert "\nRan on " in printed and "['text layer0', 'text layer1', 'text rollout']" in printed
    assert "\n['L1 grad x attn', 'L1 rollout']\n" in printed and "\n# Study: size\n" in printed
    assert re.search(r"^(match|no match) \['head', 'entropy', 'confidence', 'share image'\]", printed, re.M)


def test_real_photos_and_voices_are_called_unlike_the_training_scenes_and_the_bundled_scenes_are_not():
    """The photos and recordings that ship with gradio (a cheetah, a lion, a tower, speech, a saxophone)
    against the default's training distribution; the bundled scenes and 50 fresh test scenes pass.
    The threshold flags 1 in 100 held-out validation scenes by construction."""
    from multimodal.analysis.familiarity import Familiarity
    from multimodal.data.pool import split_seeds
    from multimodal.inference import ASSETS, load_model

    default, source = load_model()
    app = A.App(default, source, examples_dir=None)
    assert isinstance(app.familiarity, Familiarity)
    media = Path(gr.__file__).parent / "media_assets"
    photos = sorted((media / "images").glob("*.jp*g"))
    voices = [media / "audio" / n for n in ("cate_blanch.mp3", "heath_ledger.mp3", "recording1.wav", "sax.wav")]
    assert len(photos) >= 4 and all(v.exists() for v in voices)
    missed = [photo.name for photo in photos
              if "this image is unlike the scenes the model was trained on" not in app.run(str(photo), None,
                                                                                         "a red circle")[0]]
    assert missed == [], missed  # groot.jpeg's tokens pass (0.70x); its colours do not
    assert all(app.familiarity.pixel_score(Image.open(p).convert("RGB")) > 1.2 * app.familiarity.threshold["pixels"]
               for p in photos)
    for voice in voices:
        status = app.run(None, str(voice), "a rising chirp")[0]
        assert "this clip is unlike the scenes" in status and "this image" not in status, voice.name
    for stem in ("sample", "example2"):
        status = app.run(str(ASSETS / f"{stem}.png"), str(ASSETS / f"{stem}.wav"), "a red circle")[0]
        assert "unlike the scenes" not in status, stem
    flagged = 0
    for seed in split_seeds("test", 50, 0):
        scene = generate_scene(seed)
        status = app.run(scene.image, (scene.audio, scene.sample_rate), scene.caption)[0]
        flagged += "unlike the scenes" in status
    assert flagged <= 2  # about 1 in 100 expected
    assert Familiarity.for_model(MultimodalModel.from_specs()) is None  # no training record: nothing to compare


def test_an_image_whose_colours_lie_beyond_every_held_out_scene_is_called_unfamiliar():
    """Hand-computed: bank colours black and white; a 2 x 5 image of nine pixels at (0, 0, 25/255) and
    one grey pixel (127/255 in each channel). The 90th percentile of ten sorted distances
    interpolates 10% of the way from the ninth to the tenth: 0.098 + 0.1 * (0.863 - 0.098) = 0.175."""
    from multimodal.analysis.familiarity import PIXELS, Familiarity

    fam = Familiarity({PIXELS: torch.tensor([[0.0, 0, 0], [1, 1, 1]])}, {PIXELS: 0.2}, pixel_size=(2, 5))
    image = np.zeros((2, 5, 3), np.uint8)
    image[..., 2] = 25  # 0.098 from black
    image[1, 4] = 127  # 0.863 from black, 0.869 from white
    near, far = 25 / 255, math.sqrt(3 * (127 / 255) ** 2)
    assert fam.pixel_score(image) == pytest.approx(near + 0.1 * (far - near), abs=1e-6)
    tokens = {"image": ModalityTokens(torch.ones(1, 2, 4), torch.ones(1, 2, dtype=torch.bool), "image",
                                      torch.zeros(1, 2, dtype=torch.bool), None)}
    assert fam.notices(tokens, image=image) == []  # 0.175 < 0.2 (no token bank: tokens are not read)
    fam.threshold[PIXELS] = 0.15
    (notice,) = fam.notices(tokens, image=image)
    assert notice.startswith("this image is unlike the scenes") and "its colours lie 0.17 " in notice
    assert fam.notices(tokens) == []  # no picture given: nothing to read the colours of


def test_a_visitor_can_switch_among_the_checkpoints_of_a_models_folder(checkpoint, files, tmp_path):
    """`demo --models DIR`: the default, the model loaded at start and every checkpoint in DIR are offered;
    a choice loads once and is used by that session's runs; a folder that is not there is refused."""
    models = tmp_path / "models"
    models.mkdir()
    torch.manual_seed(1)
    one_layer = FusionConfig(dim=32, heads=2, layers=1, query="text")
    MultimodalModel.from_specs(fusion=one_layer).save_pretrained(models / "small")
    (models / "notes").mkdir()  # not a checkpoint: not offered
    app = A.App(MultimodalModel.from_pretrained(checkpoint), checkpoint, examples_dir=None, models_dir=models)
    assert list(app.choices) == [checkpoint.name, "default", "local", "small"]  # local: the embedded control
    chosen, info, layer, ablate, token, session = app.choose("small")
    assert chosen == "small" and "fusion 1 layer x 2 heads" in info and session is None
    assert layer.choices == [("layer 0", 0)] and ablate.choices == [("L0 H0", "L0 H0"), ("L0 H1", "L0 H1")]
    out = app.run(files["image"], None, CAPTION, model_name="small")
    assert len(out[7]) == 2 and out[-1].model_name == "small"  # 1 layer x 2 heads in the table
    assert app.bench("small") is app.bench("small")  # loaded once
    assert len(app.run(files["image"], None, CAPTION)[7]) == 8  # no choice: the model loaded at start
    default = app.run(files["image"], None, "a tabby cat", model_name="default")[0]
    assert "'cat'" in default and "embedded default" in app.choose("default")[1]
    assert "the embedded model `local`" in app.choose("local")[1]
    with pytest.raises(gr.Error):
        app.choose("nothing")
    with pytest.raises(InputError, match="no such folder"):
        A.App(MultimodalModel.from_pretrained(checkpoint), checkpoint, models_dir=tmp_path / "absent")


def test_relevance_is_drawn_beside_the_heads_and_scored_like_them(client, app, files):
    """/relevance after an example run (it carries ground truth): one grid per layer and modality whose
    last panel is the layer's gradient-weighted relevance, and a table scoring heads and relevance alike."""
    from multimodal.analysis.relevance import gradient_relevance, model_score_fn

    image, audio, caption, gt = app.examples[0]
    run(client, image, audio, caption, gt)
    gallery, table, note = client.predict(A.MEAN_TOKEN, api_name="/relevance")
    assert [item["caption"] for item in gallery] == [f"layer {l}, {m}" for l in (0, 1)
                                                     for m in ("image", "audio")]
    assert "grad x attn" in note and "scores every head, the relevance and the rollout" in note
    panels = [r[0] for r in table["data"]]
    assert panels == [f"L{layer} {p}" for layer in (0, 1) for p in ("H0", "H1", "H2", "H3", "grad x attn", "rollout")]
    assert {"pointing image", "pointing image, strict", "mass in event"} <= set(table["headers"])
    # the relevance drawn is the library's: its query-summed form is gradient_relevance's
    inputs = inference.load_inputs(image, audio, caption)
    out, rel = inference.run_with_relevance(app.model, inputs)
    maps = out.maps
    with torch.enable_grad():
        tokens = app.model.encode(inference._batches(app.model, inputs))
    total = gradient_relevance(model_score_fn(app.model), tokens).scores
    content = maps.content_queries().float()
    r = content / content.sum(-1, keepdim=True)
    by_layer = sum(torch.einsum("bq,bqk->bk", r, rel.weights[l][:, 0]) * maps.key_mask for l in rel.layers)
    torch.testing.assert_close(by_layer, total, rtol=1e-5, atol=1e-7)


def test_a_committed_studys_report_and_plots_are_shown(client, app):
    from multimodal.app.session import study_reports

    names = list(study_reports())
    assert {"size", "attention_kind", "positional", "queries", "training_dynamics"} <= set(names)
    report, plots = client.predict("size", api_name="/study")
    assert report.startswith("# Study: size") and "Do larger fusion blocks" in report
    captions = [p["caption"] for p in plots]
    assert "summary" in captions and "per-head heatmaps: fusion.layers=1,fusion.heads=4,seed=0" in captions
    assert all(Path(value(p["image"])).stat().st_size > 1000 for p in plots)
    with pytest.raises(AppError, match="not in the list of choices"):  # the dropdown refuses it first
        client.predict("nope", api_name="/study")
    with pytest.raises(gr.Error, match="no committed study named 'nope'"):  # and the handler, called directly
        app.study("nope")
