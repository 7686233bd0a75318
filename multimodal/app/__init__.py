"""The Gradio app, a face over `multimodal.inference`: `limits` (what it accepts), `session` (the
handlers and the plain functions under them), `page` (the `gr.Blocks` layout and `serve`).

    from multimodal.app import App, build_demo, launch_kwargs
    from multimodal.inference import load_model
    demo = build_demo(App(*load_model()))     # the embedded default; demo.launch(**launch_kwargs())
"""

from multimodal.app.limits import *  # noqa: F401,F403  (the limits are part of the app's documented surface)
from multimodal.app.page import CSS, ImageUpload, build_demo, help_markdown, launch_kwargs, serve  # noqa: F401
from multimodal.app.session import (MEAN_QUERY, MEAN_TOKEN, App, GroundTruth, Result,  # noqa: F401
                                    find_examples, grounding_scores, head_mask_from, load_ground_truth,
                                    metrics_rows, parse_query, query_labels)
