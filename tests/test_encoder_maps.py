"""The encoders' own heads drawn: per layer and head, from CLS or the mean token, and the rollout."""

import json
import re
import numpy as np
import pytest
import torch
from PIL import Image

import multimodal.drawing as drawing
from multimodal.analysis.relevance import attention_rollout
from multimodal.cli import main
from multimodal.inference import SAMPLE, load_inputs, run
from multimodal.model import MultimodalModel
from multimodal.types import InputError


@pytest.fixture(scope="module")
def captured():
    torch.manual_seed(0)
    model = MultimodalModel.from_specs(image="vit-conv-scenes", audio="ast-tiny-scenes",
                                       fusion={"dim": 64, "heads": 2, "layers": 1, "query": "text"}).eval()
    inputs = load_inputs(str(SAMPLE["image"]), str(SAMPLE["audio"]), SAMPLE["text"].read_text())
    out = run(model, inputs, capture_attention=True)
    return inputs, out.tokens


def spy(monkeypatch, name):
    seen = []
    real = getattr(drawing, name)
    monkeypatch.setattr(drawing, name, lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    return seen


def test_image_heads_draw_the_cls_row_over_the_patch_grid_and_the_rollout(captured, monkeypatch):
    inputs, tokens = captured
    t = tokens["image"]
    seen = spy(monkeypatch, "image_head_grid")
    rendered = drawing.render_encoder(t, image=inputs.image)
    assert [r.layer for r in rendered] == [0, 1, -1] and {r.modality for r in rendered} == {"encoder_image"}
    gh, gw = t.geometry.grid
    p = t.geometry.num_prefix
    for layer in (0, 1):
        maps = seen[layer][0][1]  # (h, gh, gw)
        want = t.self_attention[layer][0, :, 0, p:].reshape(-1, gh, gw)  # CLS's row over the patches
        np.testing.assert_allclose(maps, want.numpy(), rtol=1e-6)
        assert seen[layer][1]["labels"] == [f"L{layer} H{h}" for h in range(4)]
    roll = attention_rollout([a for a in t.self_attention])[0, 0, p:].reshape(1, gh, gw)
    np.testing.assert_allclose(seen[2][0][1], roll.numpy(), rtol=1e-6)
    assert seen[2][1]["labels"] == ["rollout, all layers"]


def test_text_heads_from_the_mean_token_and_audio_heads_over_the_first_windows_columns(captured, monkeypatch):
    inputs, tokens = captured
    t = tokens["text"]
    seen = spy(monkeypatch, "text_head_grid")
    drawing.render_encoder(t, source="mean")
    content = (t.mask & ~t.special)[0]
    want = t.self_attention[0][0][:, content].mean(1)  # (h, N): the content tokens' mean row
    np.testing.assert_allclose(seen[0][0][1], want.numpy(), rtol=1e-5)
    assert "mean over tokens" in seen[0][1]["title"]

    a = tokens["audio"]
    seen = spy(monkeypatch, "audio_head_grid")
    drawing.render_encoder(a, audio=inputs.audio)
    F = a.geometry.freq_bins
    row = a.self_attention[1][0, :, 0, 2:]  # CLS row over the first window's time-major patches
    T = row.shape[-1] // F
    np.testing.assert_allclose(seen[1][0][2], row.reshape(-1, T, F).sum(-1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(seen[1][0][3], np.asarray(a.geometry.times[:T]))
    with pytest.raises(InputError, match="drawn from cls or mean"):
        drawing.render_encoder(t, source="patch")


def test_maps_command_writes_encoder_views_and_names_encoders_without_layers(tmp_path, capsys):
    """The default's three encoders each have 2 self-attention layers: all are drawn. The embedded
    zero-depth control (`local`) has none in its image and audio encoders, and says so."""
    assert main(["maps", "--sample", "--encoder-maps", "--out", str(tmp_path / "default")]) == 0
    printed = capsys.readouterr()
    assert "no self-attention layers" not in printed.err
    # the default reads event order off its maps: the sample's falling chirp (0.23-0.79 s), then its rising
    # chirp (1.97-2.50 s), each phrase centred inside its own event
    found = re.search(r"Event order, read off the audio maps: 'a falling chirp' centred at ([0-9.]+) s, then "
                      r"'a rising chirp' at ([0-9.]+) s: in order \(term \+", printed.out)
    assert found, printed.out
    assert 0.23 < float(found[1]) < 0.79 and 1.97 < float(found[2]) < 2.50
    order = json.loads((tmp_path / "default" / "summary.json").read_text())["event_order"]
    assert len(order) == 1 and order[0]["then_s"] - order[0]["first_s"] > 0.5 and order[0]["term"] > 0
    names = {p.name for p in (tmp_path / "default").iterdir()}
    assert {f"encoder_{m}_{k}.png" for m in ("text", "image", "audio") for k in ("layer0", "layer1", "rollout")} <= names
    assert Image.open(tmp_path / "default" / "encoder_image_rollout.png").size[0] > 100
    assert main(["maps", "--sample", "--model", "local", "--encoder-maps", "--out", str(tmp_path / "local")]) == 0
    err = capsys.readouterr().err
    assert "the image and audio encoders have no self-attention layers to draw" in err
    names = {p.name for p in (tmp_path / "local").iterdir()}
    assert {"encoder_text_layer0.png", "encoder_text_layer1.png", "encoder_text_rollout.png"} <= names
    assert not any(n.startswith(("encoder_image", "encoder_audio")) for n in names)
    assert Image.open(tmp_path / "local" / "encoder_text_rollout.png").size[0] > 100


def test_maps_command_ends_each_grid_with_the_relevance_panel(tmp_path, monkeypatch):
    seen = spy(monkeypatch, "image_head_grid")
    assert main(["maps", "--sample", "--relevance", "--out", str(tmp_path)]) == 0
    labels = seen[0][1]["labels"]
    assert labels[-3:] == ["mean", "grad x attn", "rollout"] and seen[0][1]["show_mean"] is False
    panels = seen[0][0][1]  # heads, mean, relevance, rollout: each renormalised within the image
    np.testing.assert_allclose(panels[-3], panels[:-3].mean(0), rtol=1e-6)
    np.testing.assert_allclose(panels.reshape(len(panels), -1).sum(1), 1.0, rtol=1e-5)
    assert main(["maps", "--sample", "--relevance", "--head", "0", "--out", str(tmp_path / "x")]) == 2


def test_a_pooled_panel_leaves_out_queries_with_no_mass_in_the_modality():
    """Gradient relevance clamps negative contributions to zero, so a query can have none on a modality's
    keys (the shipped default's sample: one of its 17 queries on the image). Averaged over the queries as it
    was, such a row diluted the panel (it summed to 16/17); it is left out, and the panel sums to 1. Raw
    (not renormalised) rows are averaged as they are."""
    rows = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # (h=1, Nq=3, keys)
    qw = torch.full((3,), 1 / 3)
    np.testing.assert_allclose(drawing._pool(rows, qw, skip_empty=True), [[0.25, 0.75, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(drawing._pool(rows, qw), [[0.5 / 3, 1.5 / 3, 0.0]], rtol=1e-6)
    one = torch.tensor([0.0, 1.0, 0.0])  # the chosen query has no mass: an empty panel, not a division by 0
    np.testing.assert_allclose(drawing._pool(rows, one, skip_empty=True), [[0.0, 0.0, 0.0]])


def test_every_view_works_with_a_text_encoder_loaded_by_path(tmp_path, capsys):
    """A transformers BERT saved to a folder (the layout of a downloaded all-MiniLM or bert-base) and
    given by path: the fusion maps, the relevance panels and the encoder views all draw."""
    from multimodal.encoders import build_encoder

    folder = tmp_path / "bert"
    build_encoder("text", "bert-tiny-scenes").save_pretrained(folder)
    out = tmp_path / "maps"
    assert main(["maps", "--sample", "--text-encoder", str(folder), "--query", "text", "--fusion-heads", "4",
                 "--encoder-maps", "--relevance", "--out", str(out)]) == 0
    assert "RANDOM weights" in capsys.readouterr().err  # built on the fly: its fusion block is untrained
    names = {p.name for p in out.iterdir()}
    assert {"layer0_image.png", "layer1_audio.png", "encoder_text_layer1.png", "encoder_text_rollout.png",
            "encoder_image_rollout.png", "encoder_audio_layer0.png"} <= names
