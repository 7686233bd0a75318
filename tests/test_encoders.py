"""Encoders: built-ins encode with consistent geometry, save/load and config round trips, attention capture."""

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from multimodal.encoders import (BUILTINS, AudioEncoder, ImageEncoder, TextEncoder, build_encoder,
                                 encoder_from_config)
from multimodal.encoders.audio import AST_PREFIX, HOP_SECONDS, input_spectrogram
from multimodal.encoders.registry import register_builtin
from multimodal.encoders.text import batch_phrase_groups, phrase_groups
from multimodal.types import InputError

BUILTIN = {"text": "bert-tiny-scenes", "image": "vit-tiny-scenes", "audio": "ast-tiny-scenes"}


def noise(seconds: float, rate: int = 16000, seed: int = 0) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * rate))).astype(np.float32), rate


def sample_inputs(modality: str) -> list:
    if modality == "text":
        return ["A red circle, then a RISING chirp.", "blue square"]
    if modality == "image":
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), rng.integers(0, 256, (128, 128), dtype=np.uint8)]
    return [noise(6.0), noise(1.0, seed=1)]  # 6 s fills two 3 s windows


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return {m: build_encoder(m, spec) for m, spec in BUILTIN.items()}


def assert_rows_sum_to_one(maps, layers):
    assert isinstance(maps, list) and len(maps) == layers
    for a in maps:
        assert a.dim() == 4 and a.shape[-1] == a.shape[-2]
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-5, rtol=0)


# -- built-ins ---------------------------------------------------------------------------


def test_builtins_are_registered_and_typed(encoders):
    for m, spec in BUILTIN.items():
        assert spec in BUILTINS[m]
        enc = encoders[m]
        assert enc.modality == m and enc.spec == spec and enc.dim == 128 and not enc.training
    assert isinstance(encoders["text"], TextEncoder)
    assert isinstance(encoders["image"], ImageEncoder)
    assert isinstance(encoders["audio"], AudioEncoder)


def test_text_tokens_and_spans(encoders):
    texts = ["  A red circle, then a RISING chirp. ", "blue square xyz"]
    with torch.no_grad():
        out = encoders["text"].encode(texts)
    B, N, D = out.tokens.shape
    assert (B, D) == (2, 128) and out.modality == "text"
    g = out.geometry
    assert g.texts == [t.strip() for t in texts]
    for i in range(B):
        assert len(g.tokens[i]) == len(g.spans[i]) == N
        for tok, (a, b), real, special in zip(g.tokens[i], g.spans[i], out.mask[i].tolist(),
                                              out.special[i].tolist()):
            if not real:
                assert tok == "" and (a, b) == (0, 0) and not special
            elif special:
                assert tok in ("[CLS]", "[SEP]")
            else:
                assert g.texts[i][a:b].lower() == tok.removeprefix("##")
    assert out.mask[0].all() and not out.mask[1].all()  # the shorter text is padded
    assert g.tokens[1][1:3] == ["blue", "square"] and g.tokens[1][3:6] == ["x", "##y", "##z"]


def test_phrase_groups_split_at_joining_words_and_keep_word_pieces():
    tokens = ["[CLS]", "a", "red", "circle", "and", "a", "sm", "##and", "with", "a", "rising", "chirp", ",",
              "then", "a", "tone", "[SEP]", ""]
    content = [t not in ("[CLS]", "[SEP]", "") for t in tokens]
    assert phrase_groups(tokens, content) == [-1, 0, 0, 0, -1, 1, 1, 1, -1, 2, 2, 2, -1, -1, 3, 3, -1, -1]


def test_phrase_pooling_gives_every_phrase_token_the_phrase_mean(encoders, tmp_path):
    text = encoders["text"]
    caps = ["a large white triangle and a blue cross with a low tone", "a red circle"]
    batch = text.preprocess(caps)
    with torch.no_grad():
        plain = text(batch).tokens
        text.phrase_pooling = True
        try:
            pooled = text(batch).tokens
            rebuilt = encoder_from_config("text", text.config_dict(), tokenizer_dir=text.save_tokenizer(tmp_path))
        finally:
            text.phrase_pooling = False
    assert rebuilt.phrase_pooling  # the option travels with the checkpoint's config
    groups = batch_phrase_groups(batch)
    for b in range(2):
        for g in range(int(groups[b].max()) + 1):
            rows = groups[b] == g
            torch.testing.assert_close(pooled[b, rows], plain[b, rows].mean(0).expand(int(rows.sum()), -1))
        outside = groups[b] < 0
        torch.testing.assert_close(pooled[b, outside], plain[b, outside])  # CLS, SEP, joining words, padding
    assert groups[0].max() == 2 and groups[1].max() == 0


def test_text_truncates_long_input(encoders):
    out = encoders["text"].encode(["red circle " * 100])
    assert out.tokens.shape[1] == 64 and out.special[0, -1]


def test_text_without_words_is_refused(encoders):
    with pytest.raises(InputError, match="no recognisable words"):
        encoders["text"].encode(["\U0001F600\U0001F680 \U0001F3B5"])
    with pytest.raises(InputError, match="empty"):
        encoders["text"].encode(["   "])


def test_image_tokens_and_grid(encoders):
    with torch.no_grad():
        out = encoders["image"].encode(sample_inputs("image"))
    g = out.geometry
    assert g.grid == (8, 8) and g.image_size == (128, 128) and g.patch_size == (16, 16) and g.num_prefix == 1
    assert out.tokens.shape == (2, g.num_prefix + 8 * 8, 128)
    assert g.original_sizes == [(40, 60), (128, 128)]
    assert out.mask.all() and out.special[:, :1].all() and not out.special[:, 1:].any()


def test_conv_stem_vit_tokens_geometry_and_round_trips(tmp_path):
    """vit-conv-scenes: timm's VisionTransformer with a HybridEmbed over a 4-conv stem. Its
    embed's own patch size counts feature cells (1); the geometry must say 16 pixels."""
    torch.manual_seed(0)
    enc = build_encoder("image", "vit-conv-scenes")
    batch = enc.preprocess(sample_inputs("image"))
    with torch.no_grad():
        out = enc(batch)
        g = out.geometry
        assert g.grid == (8, 8) and g.patch_size == (16, 16) and g.num_prefix == 1
        assert out.tokens.shape == (2, 1 + 64, 128)
        again = encoder_from_config("image", enc.config_dict())
        again.load_state_dict(enc.state_dict())
        torch.testing.assert_close(again(batch).tokens, out.tokens)
        enc.save_pretrained(tmp_path / "conv")
        assert not list(tmp_path.glob("conv/*.bin")) and (tmp_path / "conv" / "model.safetensors").is_file()
        torch.testing.assert_close(ImageEncoder.from_directory(tmp_path / "conv")(batch).tokens, out.tokens)


def test_local_builtins_keep_tokens_local_and_centred():
    """vit-local-scenes / ast-local-scenes: a change in one place moves only the tokens around it,
    and the image token that moves most is the changed cell itself (the 4x4-kernel stem is centred)."""
    torch.manual_seed(0)
    img = build_encoder("image", "vit-local-scenes")
    assert img.spec == "vit-local-scenes" and img.dim == 128
    a = np.zeros((128, 128, 3), np.uint8)
    b = a.copy()
    b[48:64, 80:96] = 255  # cell (3, 5)
    with torch.no_grad():
        moved = (img.encode([a]).tokens - img.encode([b]).tokens).norm(dim=-1)[0, 1:].view(8, 8)
    assert divmod(int(moved.argmax()), 8) == (3, 5)
    assert moved[:2].max() == 0 and moved[:, :3].max() == 0 and moved[5:].max() == 0  # nothing far away
    aud = build_encoder("audio", "ast-local-scenes")
    assert aud.spec == "ast-local-scenes" and aud.model.config.num_hidden_layers == 0
    quiet, rate = noise(3.0)
    loud = quiet.copy()
    loud[int(2.0 * rate):int(2.2 * rate)] += 0.5 * np.sin(np.arange(int(0.2 * rate)) * 0.3).astype(np.float32)
    with torch.no_grad():
        out = aud.encode([(quiet, rate)])
        diff = (out.tokens - aud.encode([(loud, rate)]).tokens).norm(dim=-1)[0]  # (T * F,)
    times = torch.tensor(out.geometry.times).repeat_interleave(out.geometry.freq_bins)
    assert diff[times < 1.5].max() == 0 and diff[(times > 1.9) & (times < 2.3)].max() > 0


def test_window_builtins_keep_tokens_near_and_round_trip(tmp_path):
    """vit-window-scenes / ast-window-scenes: transformer layers whose self-attention stays within one
    cell / one time column. With the LayerScale branches scaled up (so the blocks really mix), a change
    in cell (3, 5) still reaches no token more than 1 (stem) + 2 (two blocks) cells away, whereas the
    same blocks attending globally move every token; the masks survive save/load."""
    torch.manual_seed(0)
    a = np.zeros((128, 128, 3), np.uint8)
    b = a.copy()
    b[48:64, 80:96] = 255  # cell (3, 5)
    for window in (1, 0):
        img = build_encoder("image", "vit-window-scenes", init_values=1.0, window=window)
        with torch.no_grad():
            moved = (img.encode([a]).tokens - img.encode([b]).tokens).norm(dim=-1)[0, 1:].view(8, 8)
        far = torch.ones(8, 8, dtype=torch.bool)
        far[0:7, 2:8] = False  # rows 3 +- 3, columns 5 +- 3
        if window:
            assert moved[far].max() == 0 and moved[3, 5] > 0
            assert img.config_dict()["model_args"]["window"] == 1
            img.save_pretrained(tmp_path / "vit")
            again = ImageEncoder.from_directory(tmp_path / "vit")
            assert again.model.window == 1
            torch.testing.assert_close(again.encode([b]).tokens, img.encode([b]).tokens)
        else:
            assert moved[far].min() > 0  # global attention: the change reaches every token
    quiet, rate = noise(3.0)
    loud = quiet.copy()
    loud[int(2.0 * rate):int(2.2 * rate)] += 0.5 * np.sin(np.arange(int(0.2 * rate)) * 0.3).astype(np.float32)
    for time_window in (1, 0):
        aud = build_encoder("audio", "ast-window-scenes", branch_scale=1.0, time_window=time_window)
        with torch.no_grad():
            out = aud.encode([(quiet, rate)])
            diff = (out.tokens - aud.encode([(loud, rate)]).tokens).norm(dim=-1)[0]  # (T * F,)
            out.self_attention = aud.encode([(quiet, rate)], capture_attention=True).self_attention  # eager
        times = torch.tensor(out.geometry.times).repeat_interleave(out.geometry.freq_bins)
        if time_window:
            # the burst's patches span ~1.85-2.35 s; two layers reach 0.2 s further: nothing before 1.5 s moves
            assert diff[times < 1.5].max() == 0 and diff[(times > 1.9) & (times < 2.3)].max() > 0
            weights = out.self_attention[0][0, 0, 2:, 2:]  # (T*F, T*F) time-major, prefix left out
            col = torch.arange(weights.shape[0]) // out.geometry.freq_bins
            assert weights[(col[:, None] - col[None, :]).abs() > 1].max() == 0
            assert out.self_attention[0][0, :, 2:, :2].max() == 0  # patches do not read the prefix tokens
            aud.save_pretrained(tmp_path / "ast")
            assert AudioEncoder.from_directory(tmp_path / "ast").time_window == 1
        else:
            assert diff[times < 1.5].max() > 0


@pytest.mark.parametrize("spec,bands,cols,frames,reach", [("ast-window-fine-scenes", 8, 37, 8, 2),
                                                           ("ast-window-fine-mel32-scenes", 4, 37, 8, 2),
                                                           ("ast-window-mel40-scenes", 4, 30, 10, 2),
                                                           ("ast-column-mel40-scenes", 4, 30, 10, 0)])
def test_finer_audio_window_builtins_give_columns_that_stay_near(tmp_path, spec, bands, cols, frames, reach):
    """The audio grids whose patches read no more than their own column: ast-window-fine-scenes' 8x8 patches 8
    frames apart (8 bands x 37 columns a 3 s window; on 32 mel bins, 4 bands), ast-window-mel40-scenes' 10x10
    patches 10 frames apart on 40 mel bins (4 x 30), ast-column-mel40-scenes' layers within their own column.
    With the branches mixing (scale 1), a burst at 2.0-2.2 s moves no token whose patch ends more than two
    layers' windows (`reach`: 2 columns; 0 for the column-only layers) before it, and the grid round-trips
    through save/load."""
    torch.manual_seed(0)
    quiet, rate = noise(3.0)
    loud = quiet.copy()
    loud[int(2.0 * rate):int(2.2 * rate)] += 0.5 * np.sin(np.arange(int(0.2 * rate)) * 0.3).astype(np.float32)
    aud = build_encoder("audio", spec, branch_scale=1.0)
    assert (aud.freq_bins, aud.time_cols, aud.patch_size, aud.time_stride, aud.time_window) == (bands, cols, frames,
                                                                                               frames, 1)
    with torch.no_grad():
        out = aud.encode([(quiet, rate)])
        diff = (out.tokens - aud.encode([(loud, rate)]).tokens).norm(dim=-1)[0]  # (T * F,)
    times = torch.tensor(out.geometry.times)
    step = frames * HOP_SECONDS
    assert torch.allclose(times[1:] - times[:-1], torch.tensor(step, dtype=times.dtype))
    centres = times.repeat_interleave(out.geometry.freq_bins)
    half = (frames - 1) / 2 * HOP_SECONDS + 0.0125  # a patch centred at c reads c +- this (with the fbank window)
    # the burst (with the fbank window) starts near 1.98 s
    assert diff[centres < 1.98 - half - reach * step].max() == 0
    if reach:  # the windowed layers do carry the burst to the column before its own
        assert diff[(centres < 1.98 - half) & (centres > 1.98 - half - step)].max() > 0
    assert diff[(centres > 2.05) & (centres < 2.15)].min() > 0
    aud.save_pretrained(tmp_path / "ast")
    again = AudioEncoder.from_directory(tmp_path / "ast")
    assert (again.freq_bins, again.time_cols, again.time_window, again.spec) == (bands, cols, 1, str(tmp_path / "ast"))
    assert again.column_only == aud.column_only == (reach == 0)
    with torch.no_grad():
        torch.testing.assert_close(again.encode([(loud, rate)]).tokens, aud.encode([(loud, rate)]).tokens)


@pytest.mark.parametrize("spec,reach", [("vit-window-fine-scenes", 4), ("vit-window-fine-wide-scenes", 5)])
def test_fine_window_builtins_give_8px_cells_centred_and_near(spec, reach, tmp_path):
    """The fine-grid ViTs: 16 x 16 tokens of 8 px; with the blocks mixing (LayerScale 1), a change in
    one cell moves that cell's token most and no token further than the stem's reach plus two blocks'
    windows (`reach` cells; the wide stem's stride-1 conv adds one); they round-trip through save/load."""
    torch.manual_seed(0)
    img = build_encoder("image", spec, init_values=1.0)
    a = np.zeros((128, 128, 3), np.uint8)
    b = a.copy()
    b[64:72, 40:48] = 255  # cell (8, 5)
    with torch.no_grad():
        out = img.encode([a])
        moved = (out.tokens - img.encode([b]).tokens).norm(dim=-1)[0, 1:].view(16, 16)
    assert out.geometry.grid == (16, 16) and out.geometry.patch_size == (8, 8)
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    far = ((rows - 8).abs() > reach) | ((cols - 5).abs() > reach)
    assert moved[far].max() == 0 and moved[~far].max() > 0
    img.save_pretrained(tmp_path / "fine")
    again = ImageEncoder.from_directory(tmp_path / "fine")
    with torch.no_grad():
        torch.testing.assert_close(again.encode([b]).tokens, img.encode([b]).tokens)
    img = build_encoder("image", spec)  # as built-in: LayerScale 1e-4, so each token is about its own cell's
    with torch.no_grad():
        moved = (img.encode([a]).tokens - img.encode([b]).tokens).norm(dim=-1)[0, 1:].view(16, 16)
    assert divmod(int(moved.argmax()), 16) == (8, 5)


def test_audio_batch_padding_and_times(encoders):
    enc = encoders["audio"]
    with torch.no_grad():
        out = enc.encode(sample_inputs("audio"))
    g = out.geometry
    T, F = len(g.times), g.freq_bins
    assert F == 4 and out.tokens.shape == (2, T * F, 128) and g.num_prefix == 0
    assert np.all(np.diff(g.times) > 0) and g.times[0] < 0.2
    assert g.durations == [6.0, 1.0] and g.sample_rate == 16000
    cols = out.mask.view(2, T, F)
    assert (cols == cols[..., :1]).all()  # a whole column is in or out
    real = cols[..., 0].sum(1).tolist()
    assert real[0] == T > real[1] > 0  # the 1 s clip's padded columns are masked
    starts = (np.array(g.times) - 0.0125) / HOP_SECONDS - (enc.patch_size - 1) / 2  # first frame per column
    for i, seconds in enumerate(g.durations):  # real columns start inside the clip's frames
        frames = 1 + (int(seconds * 16000) - 400) // 160
        assert np.array_equal(cols[i, :, 0].numpy(), starts.round() < frames)
    assert not out.special.any()
    alone = enc.encode([sample_inputs("audio")[1]])  # batching does not change a clip's real tokens
    n = alone.tokens.shape[1]
    torch.testing.assert_close(alone.tokens, out.tokens[1:, :n], atol=1e-5, rtol=0)


def test_audio_tokens_are_time_major_with_true_times():
    enc = build_encoder("audio", "ast-tiny-scenes", num_hidden_layers=0)  # tokens = norm(patch embedding)
    wav = np.zeros(3 * 16000, np.float32)
    wav[16000:17600] = 0.5 * np.sin(np.arange(1600) * 0.3)  # a burst at 1.0-1.1 s in silence
    with torch.no_grad():
        out = enc.encode([(wav, 16000)])
    g = out.geometry
    cols = out.tokens[0].view(len(g.times), g.freq_bins, -1)  # (T, F, D)
    differs = (cols - cols[:1]).abs().amax(dim=(1, 2)) > 1e-4  # (T,) columns unlike the silent first one
    times = np.array(g.times)[differs.numpy()]
    assert len(times) > 0 and times.min() > 0.85 and times.max() < 1.25


def test_audio_windows_in_chunks_match(encoders, monkeypatch):
    import multimodal.encoders.audio as audio_module

    enc = encoders["audio"]
    batch = enc.preprocess([noise(6.5), noise(0.01, seed=2)])  # 3 windows each; 160 samples < one frame
    assert batch["features"].shape[:2] == (2, 3) and batch["frames"].tolist() == [648, 1]
    with torch.no_grad():
        whole = enc(batch, capture_attention=True)
        monkeypatch.setattr(audio_module, "WINDOWS_PER_CALL", 4)  # chunks split the items' windows
        chunked = enc(batch, capture_attention=True)
    torch.testing.assert_close(chunked.tokens, whole.tokens, atol=1e-5, rtol=0)
    for a, b in zip(chunked.self_attention, whole.self_attention):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert whole.mask[1].sum() == whole.geometry.freq_bins  # the 10 ms clip: one real column


def test_audio_stereo_48k_and_8bit(encoders):
    rng = np.random.default_rng(0)
    stereo = (rng.standard_normal((48000 * 2, 2)) * 3000).astype(np.int16)  # 2 s at 48 kHz
    buf = io.BytesIO()
    sf.write(buf, (rng.standard_normal(16000) * 0.3).clip(-1, 1), 16000, format="WAV", subtype="PCM_U8")
    with torch.no_grad():
        a = encoders["audio"].encode([(stereo, 48000)])
        b = encoders["audio"].encode([buf.getvalue(), (rng.integers(0, 256, 8000, dtype=np.uint8), 8000)])
    assert a.geometry.durations == [2.0] and torch.isfinite(a.tokens).all()
    assert b.geometry.durations == [1.0, 1.0] and torch.isfinite(b.tokens).all()


def test_audio_tokens_grow_linearly(encoders):
    enc = encoders["audio"]
    counts = {}
    for seconds in (10.0, 25.0):
        with torch.no_grad():
            out = enc.encode([noise(seconds)])
        counts[seconds] = int(out.mask.sum()) // out.geometry.freq_bins
        assert out.geometry.times[-1] <= seconds + 3.0
    assert counts[25.0] / counts[10.0] == pytest.approx(2.5, rel=0.05)


def test_input_spectrogram_helper():
    spec, times = input_spectrogram(noise(1.0), num_mel_bins=64)
    assert spec.shape[0] == 64 and spec.shape[1] == len(times) == 98
    assert np.all(np.diff(times) > 0) and np.isfinite(spec).all()


# -- attention capture -------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
def test_capture_attention(encoders, modality):
    enc = encoders[modality]
    batch = enc.preprocess(sample_inputs(modality))
    with torch.no_grad():
        plain = enc(batch)
        captured = enc(batch, capture_attention=True)
    assert plain.self_attention is None
    assert_rows_sum_to_one(captured.self_attention, layers=2)
    torch.testing.assert_close(captured.tokens, plain.tokens, atol=1e-5, rtol=1e-5)  # fused == explicit
    a = captured.self_attention[0]
    assert a.shape[:2] == (2, 4)
    if modality == "image":
        assert a.shape[-1] == captured.tokens.shape[1]
        assert all(blk.attn.fused_attn for blk in enc.model.blocks)  # restored
    elif modality == "text":
        assert a.shape[-1] == captured.tokens.shape[1]
        assert enc.model.config._attn_implementation == "sdpa"  # restored
        pad = ~captured.mask[1]
        assert a[1][..., pad].abs().max() == 0  # padding keys get no weight
    else:  # first window: 2 AST prefix tokens + its time-major patches
        g = captured.geometry
        assert a.shape[-1] == AST_PREFIX + enc.time_cols * g.freq_bins
        assert enc.model.config._attn_implementation == "sdpa"


# -- save / load / config ----------------------------------------------------------------


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
def test_save_pretrained_loads_back(encoders, modality, tmp_path):
    enc = encoders[modality]
    enc.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not any(n.endswith((".bin", ".pth", ".pt", ".pkl")) for n in names)
    loaded = build_encoder(modality, str(tmp_path))
    assert type(loaded) is type(enc) and loaded.dim == enc.dim
    inputs = sample_inputs(modality)
    with torch.no_grad():
        a, b = enc.encode(inputs), loaded.encode(inputs)
    torch.testing.assert_close(b.tokens, a.tokens, atol=1e-6, rtol=0)
    assert b.geometry == a.geometry


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
def test_config_dict_round_trip(encoders, modality, tmp_path):
    import json

    enc = encoders[modality]
    d = json.loads(json.dumps(enc.config_dict()))  # JSON-serialisable
    if modality == "text":
        enc.save_tokenizer(tmp_path)
    rebuilt = encoder_from_config(modality, d, tokenizer_dir=tmp_path)
    assert list(rebuilt.state_dict()) == list(enc.state_dict())
    rebuilt.load_state_dict(enc.state_dict())
    inputs = sample_inputs(modality)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode(inputs).tokens, enc.encode(inputs).tokens, atol=1e-6, rtol=0)


def test_text_config_without_tokenizer_dir_uses_builtin(encoders):
    rebuilt = encoder_from_config("text", encoders["text"].config_dict())
    assert rebuilt.tokenizer.get_vocab() == encoders["text"].tokenizer.get_vocab()


# -- registry and bad specs --------------------------------------------------------------


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
def test_unknown_spec_names_the_spec(modality):
    with pytest.raises(InputError) as err:
        build_encoder(modality, "no-such-encoder-xyz")
    msg = str(err.value)
    assert "'no-such-encoder-xyz'" in msg and BUILTIN[modality] in msg and "hub" in msg


def test_unknown_modality_and_bad_config():
    with pytest.raises(InputError, match="unknown modality"):
        build_encoder("smell", "bert-tiny-scenes")
    with pytest.raises(InputError, match="not a image encoder config"):
        encoder_from_config("image", {"modality": "text"})
    with pytest.raises(InputError, match="could not rebuild"):
        encoder_from_config("image", {"modality": "image", "spec": "x"})


def test_directory_without_a_model(tmp_path):
    with pytest.raises(InputError, match="could not load a image encoder from directory"):
        build_encoder("image", str(tmp_path))


def test_register_builtin_adds_an_entry():
    @register_builtin("image", "vit-micro-test")
    def vit_micro(**overrides):
        return BUILTINS["image"]["vit-tiny-scenes"](img_size=32, depth=1, **overrides)

    try:
        enc = build_encoder("image", "vit-micro-test")
        assert enc.model.patch_embed.grid_size == (2, 2) and len(enc.model.blocks) == 1
    finally:
        del BUILTINS["image"]["vit-micro-test"]


def test_bad_inputs_through_encoders(encoders):
    with pytest.raises(InputError, match="not an image"):
        encoders["image"].preprocess([b"\x89PNG corrupt"])
    with pytest.raises(InputError, match="at least 8 pixels"):
        encoders["image"].preprocess([Image.new("RGB", (1, 1))])
    with pytest.raises(InputError, match="no samples"):
        encoders["audio"].preprocess([(np.zeros(0, np.float32), 16000)])
    with pytest.raises(InputError, match="could not be read as audio"):
        encoders["audio"].preprocess([b"GIF89a not audio at all" * 10])
    for enc in encoders.values():
        with pytest.raises(InputError, match="at least one"):
            enc.preprocess([])


# -- capturing a subset of layers --------------------------------------------------------

SUBSETS = [[1], [2, 0], [-1]]


@pytest.fixture(scope="module")
def deep_encoders():
    """3-layer built-ins: a subset can sit before, between and after layers that are not captured."""
    torch.manual_seed(0)
    return {"text": build_encoder("text", "bert-tiny-scenes", num_hidden_layers=3),
            "image": build_encoder("image", "vit-tiny-scenes", depth=3),
            "audio": build_encoder("audio", "ast-tiny-scenes", num_hidden_layers=3)}


class CountFused(torch.overrides.TorchFunctionMode):
    """Counts the calls of fused attention (`F.scaled_dot_product_attention`) inside the block."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.nn.functional.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
def test_capturing_a_layer_subset_equals_the_eager_capture_of_those_layers(deep_encoders, modality):
    enc = deep_encoders[modality]
    batch = enc.preprocess(sample_inputs(modality))  # text: padded; audio: two windows for the first clip

    def hooks():  # transformers keeps hooks of its own once output_attentions was used: ours must go
        return [(n, list(m._forward_hooks), list(m._forward_pre_hooks)) for n, m in enc.model.named_modules()]

    with torch.no_grad():
        plain = enc(batch)
        every = enc(batch, capture_attention=True)  # transformers eager output_attentions / timm explicit path
        before = hooks()
        for subset in SUBSETS:
            with CountFused() as fused:
                part = enc(batch, capture_attention=subset)
            layers = sorted({l % 3 for l in subset})
            # the other layers stay fused; audio: one call per layer, the first windows then go eager
            assert fused.calls == (3 if modality == "audio" else 3 - len(layers))
            assert len(part.self_attention) == len(layers)
            for a, l in zip(part.self_attention, layers):
                assert a.shape == every.self_attention[l].shape
                if l == 0:  # same input as the eager run: bit for bit
                    assert torch.equal(a, every.self_attention[0])
                torch.testing.assert_close(a, every.self_attention[l], atol=1e-6, rtol=0)
            torch.testing.assert_close(part.tokens, plain.tokens, atol=1e-5, rtol=1e-5)  # eager == fused
    if modality == "text":
        assert every.self_attention[0][1][..., ~every.mask[1]].abs().max() == 0  # padding keys get no weight
        assert enc.model.config._attn_implementation == "sdpa"
    assert hooks() == before
    if modality == "image":
        assert all(blk.attn.fused_attn for blk in enc.model.blocks)


def test_text_layer_subset_with_autograd_and_without_known_attention_modules(deep_encoders, monkeypatch):
    import multimodal.encoders.registry as registry

    enc = deep_encoders["text"]
    batch = enc.preprocess(sample_inputs("text"))
    with torch.no_grad():
        every = enc(batch, capture_attention=True).self_attention
    recorded = enc(batch, capture_attention=[2]).self_attention  # autograd on: out-of-place, differentiable
    assert recorded[0].requires_grad
    torch.testing.assert_close(recorded[0].detach(), every[2], atol=1e-6, rtol=0)
    monkeypatch.setattr(registry, "attention_modules", lambda model: None)  # e.g. an unknown architecture
    with torch.no_grad():
        fallback = enc(batch, capture_attention=[2, 0]).self_attention  # eager output_attentions, then cut
    assert torch.equal(fallback[0], every[0]) and torch.equal(fallback[1], every[2])


@pytest.mark.parametrize("per_call", [16, 2], ids=["one-call", "chunks"])
def test_audio_layer_subset_captures_only_the_first_windows(deep_encoders, monkeypatch, per_call):
    import multimodal.encoders.audio as audio_module

    enc = deep_encoders["audio"]
    batch = enc.preprocess([noise(6.5), noise(1.0, seed=1)])  # 3 windows, then 1 (padded to 3)
    with torch.no_grad():
        every = enc(batch, capture_attention=True).self_attention
        monkeypatch.setattr(audio_module, "WINDOWS_PER_CALL", per_call)  # 2: windows 0-1, 2-3 and 4-5 per call
        with CountFused() as fused:
            part = enc(batch, capture_attention=[1])
    assert fused.calls == 3 * (6 // per_call if per_call < 6 else 1)  # each call: one fused attention per layer
    assert len(part.self_attention) == 1 and part.self_attention[0].shape[0] == 2
    torch.testing.assert_close(part.self_attention[0], every[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("modality", ["text", "image", "audio"])
def test_bad_layer_subsets_are_refused(encoders, modality):
    enc = encoders[modality]
    batch = enc.preprocess(sample_inputs(modality))
    with pytest.raises(InputError, match="layer"):
        enc(batch, capture_attention=[2])  # the built-ins have 2 layers
    with pytest.raises(InputError, match="list of layer indices"):
        enc(batch, capture_attention=["0"])
    with torch.no_grad():
        assert enc(batch, capture_attention=[]).self_attention is None
