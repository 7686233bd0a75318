"""The app's limits: explicit, shown in the page's help and enforced by the server or at the input boundary."""

from __future__ import annotations

from multimodal import io as mio
from multimodal.inference import Limits

MAX_UPLOAD_MB = 20  # per uploaded file (gradio's max_file_size)
MAX_IMAGE_PIXELS = mio.MAX_IMAGE_PIXELS  # larger images are refused (decompression bombs)
MIN_IMAGE_SIDE = mio.MIN_IMAGE_SIDE  # pixels
MAX_AUDIO_SECONDS = 30.0  # longer clips are cut to this, with a visible notice
MAX_TEXT_CHARS = 500  # longer captions are refused
CONCURRENCY_LIMIT = 2  # requests the model serves at once (the queue holds the rest)
QUEUE_MAX_SIZE = 64  # waiting requests beyond this are turned away
HOST = "127.0.0.1"  # never exposed beyond this machine unless --host says so
PORT = 7860
THUMB_SIDE = 512  # px: the image copy kept per session to draw overlays on
KEEP_OUTPUT_SECONDS = 1800  # per-request output folders older than this are deleted
MAX_OUTPUT_DIRS = 256  # and never more than this many are kept

APP_LIMITS = Limits(max_audio_seconds=MAX_AUDIO_SECONDS, max_text_chars=MAX_TEXT_CHARS, who="the demo's")
