"""The page: one `gr.Blocks` around an `App` (layout, components, launch settings) and `serve`.

`demo.launch()` runs only in `serve` (called by `multimodal demo`) or in `demos/app.py`.
API names (gradio_client): `/run` (inputs -> everything), `/view` (re-draw the last result
for another layer / query token, no model run), `/tokens` (caption -> token choices),
`/encoders` (the encoders' own heads and rollout on the last inputs), `/relevance` (gradient-weighted
relevance beside every layer's heads, scored with the last ground truth), `/study` (a committed
study's report and plots). With several models
(`demo --models DIR`) the page has a model picker; the choice is per visitor (hidden state),
and an API client gets the model loaded at start.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import gradio as gr
import torch

from multimodal.analysis.grounding import POINTING_TOLERANCE_PX
from multimodal.app.limits import (CONCURRENCY_LIMIT, HOST, KEEP_OUTPUT_SECONDS, MAX_AUDIO_SECONDS,
                                   MAX_IMAGE_PIXELS, MAX_TEXT_CHARS, MAX_UPLOAD_MB, MIN_IMAGE_SIDE, PORT,
                                   QUEUE_MAX_SIZE)
from multimodal.app.session import App, mean_label, study_reports
from multimodal.model import MultimodalModel

# ---------------------------------------------------------------------------------------
# Components and layout
# ---------------------------------------------------------------------------------------


class ImageUpload(gr.Image):
    """gr.Image that hands the handler the uploaded file untouched: io.load_image decodes and
    validates it (bombs, corrupt files, odd modes), so every refusal reads as a sentence."""

    is_template = True  # drawn by gr.Image's frontend

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):  # pasted from the clipboard
            import base64

            return base64.b64decode(payload.url.split(",", 1)[-1])
        return payload.path


def help_markdown(app: App) -> str:
    cfg = app.model.cfg
    return f"""
**Inputs.** Any subset the model can use: this model reads {', '.join(app.model.modalities)}
and asks with {'text tokens, so it needs a caption plus an image or an audio clip' if cfg.query == 'text'
else 'learned latents, so any one input is enough' if cfg.query == 'latents'
else f'{cfg.query} tokens, so it needs the {cfg.query} plus another input'}.

**Outputs, per layer.** One overlay per head and their mean ("mean" panel) on one colour scale
(legend at the right): a heatmap on the image, a band and curve over the log-mel spectrogram
(with playback), highlights on the text. With text-token queries the image and audio maps belong
to each text token: pick one in "query token", or the mean over all tokens. The text is then the
query side, so its highlight shows how *concentrated* each head's attention is for each token
(1 - entropy / log(number of keys): 1 = all weight on one key, 0 = uniform), not attention on it.

**Metrics** (one row per head; "(off)" = switched off; averaged over the content queries):
entropy (0-1, normalised as above), confidence (mean largest weight), each modality's share of
the attention; for a model whose queries compete for keys, the claimed share (how much of the keys
the queries won before each row was renormalised: a faint query's map looks as peaked as a strong
one's, its claim tells them apart; also in each grid's head labels); with ground truth: pointing game (is the peak within
{POINTING_TOLERANCE_PX} px of the object? "strict": on the object itself), energy inside the object,
attention mass inside the event's interval and temporal pointing (within one time column of the
event; "strict": inside it), averaged over the caption's phrases.

**Ablation.** Tick heads to switch them off (their output is zeroed) and press Run again.

**Limits.** upload: {MAX_UPLOAD_MB} MB per file; image: at most {MAX_IMAGE_PIXELS:,} pixels (larger
ones are refused as possible decompression bombs) and at least {MIN_IMAGE_SIDE} px a side;
RGBA, 16-bit, CMYK and palette images are converted to RGB; audio: WAV, FLAC, OGG or MP3, clips
longer than {MAX_AUDIO_SECONDS:.0f} s are cut to their first {MAX_AUDIO_SECONDS:.0f} s (with a
notice); silent clips run, with a notice that their maps mean nothing; images and clips unlike the
scenes the model was trained on, and caption words it never saw, run with a notice; caption: at most
{MAX_TEXT_CHARS} characters. {CONCURRENCY_LIMIT} requests run at once; up to {QUEUE_MAX_SIZE} wait.

**Ground truth JSON** (optional): `{{"caption": "...", "phrases": [{{"span": [s, e], "target":
"object" | "event", "index": i}}], "objects": [{{"box": [x0, y0, x1, y1]}}], "events":
[{{"start": s, "end": e}}]}}`; spans are character offsets in the caption, boxes are pixels of
the uploaded image (or of `"image_size": [H, W]`), events are seconds.
"""


CSS = """
#status { min-height: 1.5em; }
.mm-tokens { font-size: 15px; margin-bottom: 8px; }
.mm-caption p, .mm-note { font-size: 13px; color: var(--body-text-color-subdued); margin: 0 0 4px 0; }
#metrics th, #metrics th * { word-break: normal !important; overflow-wrap: normal !important; hyphens: none; }
"""


def build_demo(app: App) -> gr.Blocks:
    cfg = app.model.cfg
    mean = mean_label(cfg.query)
    with gr.Blocks(title="Multimodal attention sandbox", analytics_enabled=False,
                   delete_cache=(KEEP_OUTPUT_SECONDS, KEEP_OUTPUT_SECONDS)) as demo:
        gr.Markdown("### Multimodal attention sandbox: every head's attention over your inputs")
        chosen = gr.State(app.start.name)  # this visitor's model (hidden from the API: clients get the start model)
        with gr.Row(equal_height=True):
            picker = gr.Dropdown(list(app.choices), value=app.start.name, label="model", elem_id="model-choice",
                                 visible=len(app.choices) > 1, scale=1, min_width=160)
            info = gr.Markdown(app.info, elem_id="model-info")
        session = gr.State(None)
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=320):
                image = ImageUpload(label="image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                    height=180, elem_id="in-image")
                audio = gr.Audio(label="audio (upload or record)", sources=["upload", "microphone"],
                                 type="filepath", elem_id="in-audio")
                text = gr.Textbox(label="caption", lines=1, max_lines=4, max_length=MAX_TEXT_CHARS,
                                  elem_id="in-text", placeholder="e.g. a red circle and a rising chirp")
                truth = gr.File(label="ground truth JSON (format in the help)", file_types=[".json"],
                                type="filepath", height=60, elem_id="in-truth", render=False)
                run_btn = gr.Button("Run", variant="primary", elem_id="run")
                examples = None
                if app.examples:
                    examples = gr.Examples(app.examples, inputs=[image, audio, text, truth],
                                           label="Examples (click one: it loads and runs)",
                                           example_labels=[Path(r[0] or r[1]).stem for r in app.examples])
                ablate = gr.CheckboxGroup(app.heads, label="switch heads off (ablation), then Run",
                                          elem_id="in-ablate")
                with gr.Accordion("ground truth (optional): scores pointing/energy", open=False,
                                  elem_id="truth-box"):
                    truth.render()
            with gr.Column(scale=7, min_width=480):
                status = gr.Markdown("Give inputs and press Run.", elem_id="status")
                with gr.Row(equal_height=True):
                    score = gr.Label(label="caption/scene match (sigmoid of the match score)", num_top_classes=2,
                                     show_heading=False, elem_id="score", scale=3)
                    layer = gr.Radio([(f"layer {l}", l) for l in range(cfg.layers)], value=0, label="layer",
                                     elem_id="layer", scale=2)
                    token = gr.Dropdown([mean], value=mean, allow_custom_value=True, elem_id="token", scale=3,
                                        label="query token" if cfg.query == "text" else "query")
                grid_kw = {"type": "filepath", "format": "png", "interactive": False, "visible": False,
                           "show_label": False, "buttons": ["download", "fullscreen"]}
                with gr.Tabs(elem_id="out-tabs"):
                    with gr.Tab("Image", id="image", elem_id="tab-image"):
                        gr.Markdown("One panel per head of the chosen layer, then their **mean**, on one colour "
                                    "scale (legend at the right): attention of the chosen query over the image "
                                    "patches. Needs an image input.", elem_classes="mm-caption")
                        image_grid = gr.Image(elem_id="out-image", **grid_kw)
                    with gr.Tab("Audio", id="audio", elem_id="tab-audio"):
                        gr.Markdown("Per head, then the **mean**: the log-mel spectrogram with the head's attention "
                                    "over time as a band (bottom) and a curve. Needs an audio input.",
                                    elem_classes="mm-caption")
                        audio_grid = gr.Image(elem_id="out-audio", **grid_kw)
                        playback = gr.Audio(label="the clip the maps are drawn on", type="filepath",
                                            interactive=False, visible=False, elem_id="out-playback")
                    with gr.Tab("Text", id="text", elem_id="tab-text"):
                        text_markup = gr.HTML(visible=False, elem_id="out-text-html")
                        text_grid = gr.Image(elem_id="out-text", **grid_kw)
                    with gr.Tab("Encoders", id="encoders", elem_id="tab-encoders"):
                        gr.Markdown("The encoders' own heads on the last inputs: each encoder's self-attention "
                                    "per layer and head, and its attention rollout. Press the button after a "
                                    "Run (the encoders run again, capturing their attention).",
                                    elem_classes="mm-caption")
                        with gr.Row(equal_height=True):
                            encoder_from = gr.Radio([("CLS token", "cls"), ("mean over tokens", "mean")],
                                                    value="cls", label="attention of", elem_id="encoder-from",
                                                    scale=3)
                            encoders_btn = gr.Button("Draw encoder heads", elem_id="encoders-run", scale=1)
                        encoders_note = gr.Markdown("", elem_id="encoders-note")
                        encoder_grids = gr.Gallery(columns=1, height="auto", object_fit="contain",
                                                   elem_id="out-encoders", show_label=False)
                    with gr.Tab("Relevance", id="relevance", elem_id="tab-relevance"):
                        gr.Markdown("Gradient-weighted relevance beside the raw heads, every layer, for the chosen "
                                    "query token: what the match score actually depends on, next to where the "
                                    "heads look. Press the button after a Run (one forward and one backward pass).",
                                    elem_classes="mm-caption")
                        relevance_btn = gr.Button("Compute relevance", elem_id="relevance-run")
                        relevance_note = gr.Markdown("", elem_id="relevance-note")
                        relevance_grids = gr.Gallery(columns=1, height="auto", object_fit="contain",
                                                     elem_id="out-relevance", show_label=False)
                        relevance_table = gr.Dataframe(label="pointing / energy of every head and of the relevance "
                                                             "(with ground truth)", interactive=False, wrap=True,
                                                       elem_id="relevance-table", max_height=420)
                    with gr.Tab("Metrics", id="metrics", elem_id="tab-metrics"):
                        metrics = gr.Dataframe(label="per-head metrics, all layers (see help for definitions)",
                                               interactive=False, wrap=True, elem_id="metrics", max_height=560)
                    with gr.Tab("Studies", id="studies", elem_id="tab-studies"):
                        studies = list(study_reports())
                        study_pick = gr.Dropdown(studies, value=None, label="a committed study (multimodal/studies)",
                                                 elem_id="study-choice")
                        study_plots = gr.Gallery(columns=2, height="auto", object_fit="contain",
                                                 elem_id="out-study-plots", show_label=False)
                        study_report = gr.Markdown("", elem_id="study-report")
                    with gr.Tab("Download", id="download", elem_id="tab-download"):
                        files = gr.File(label="maps.zip: every layer's grids (PNG) for the chosen query, the raw "
                                              "maps (maps.npz + maps.json), metrics.csv, summary.json",
                                        file_count="multiple", interactive=False, elem_id="downloads")
        with gr.Accordion("Help and limits", open=False, elem_id="help"):
            gr.Markdown(help_markdown(app))

        run_inputs = [image, audio, text, truth, ablate, layer, token, chosen]
        run_outputs = [status, score, image_grid, audio_grid, text_grid, playback, text_markup, metrics, files,
                       token, session]
        view_outputs = [image_grid, audio_grid, text_grid, text_markup, files]
        gr.on([run_btn.click, text.submit], app.run, inputs=run_inputs, outputs=run_outputs, api_name="run")
        gr.on([layer.input, token.input], app.view, inputs=[session, layer, token], outputs=view_outputs,
              api_name="view", show_progress="minimal")
        text.blur(app.tokens, inputs=[text, chosen], outputs=token, api_name="tokens", show_progress="hidden")
        picker.change(app.choose, inputs=picker, outputs=[chosen, info, layer, ablate, token, session],
                      api_visibility="private")
        encoders_btn.click(app.encoders, inputs=[session, encoder_from], outputs=[encoder_grids, encoders_note],
                           api_name="encoders")
        study_pick.change(app.study, inputs=study_pick, outputs=[study_report, study_plots], api_name="study")
        relevance_btn.click(app.relevance, inputs=[session, token],
                            outputs=[relevance_grids, relevance_table, relevance_note], api_name="relevance")
        if examples is not None:
            examples.load_input_event.then(app.run, inputs=run_inputs, outputs=run_outputs,
                                           api_visibility="undocumented")
    demo.queue(default_concurrency_limit=CONCURRENCY_LIMIT, max_size=QUEUE_MAX_SIZE)
    return demo


def launch_kwargs(host: str = HOST, port: int | None = PORT, share: bool = False) -> dict:
    """Everything `demo.launch` needs besides blocking: limits, binding, no SSR, no share link."""
    return {"server_name": host, "server_port": port, "share": share, "max_file_size": f"{MAX_UPLOAD_MB}mb",
            "ssr_mode": False, "show_error": True, "css": CSS, "quiet": True}


def serve(model: MultimodalModel, source: str | Path | None, host: str = HOST, port: int = PORT,
          share: bool = False, models_dir: str | Path | None = None) -> None:
    """Build the page around a loaded model (and the checkpoints in `models_dir`, to choose from)
    and serve it until interrupted."""
    torch.set_num_threads(max(1, torch.get_num_threads() // CONCURRENCY_LIMIT))  # requests share the cores
    app = App(model, source, models_dir=models_dir)
    # Gradio's uploads and its copies of our outputs live inside this server's own folder, which is
    # removed when the server stops (Ctrl-C or SIGTERM); meanwhile delete_cache prunes them by age.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(app.outputs.root / "gradio"))
    demo = build_demo(app)
    where = f"http://{host}:{port}"
    print(f"serving the attention sandbox at {where} ({'with' if share else 'no'} share link); "
          f"{app.info.replace('**', '')}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C: gradio closes, atexit removes our folders
    demo.launch(**launch_kwargs(host, port, share))


def _interrupt(signum, frame):
    raise KeyboardInterrupt
