"""The Gradio app (demos/app.py)."""
