"""The Gradio demo in gradio's `run.py` style; the app itself lives in the package (`multimodal.app`).

    python demos/app.py [--model DIR ...]    # the same flags as `multimodal demo` (see --help)
    gradio demos/app.py                      # gradio's reload mode: serves `demo`, the embedded default
"""

import sys

if __name__ == "__main__":
    from multimodal.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
else:
    from multimodal.app import App, build_demo
    from multimodal.inference import load_model

    demo = build_demo(App(*load_model()))
