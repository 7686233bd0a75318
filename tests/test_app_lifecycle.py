"""The served app as a process: errors name the user's file, not the server's copy of it, and
SIGTERM stops it as Ctrl-C does, leaving no output folders or uploads behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multimodal import FusionConfig
from multimodal.model import MultimodalModel


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = FusionConfig(dim=32, heads=2, layers=1, query="text")
    return MultimodalModel.from_specs(fusion=cfg).save_pretrained(tmp_path_factory.mktemp("ckpt") / "m")


def _start(checkpoint: Path, tmp: Path) -> tuple[subprocess.Popen, int, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tmp / "temp"  # the server's whole temporary world: its output folders and gradio's uploads
    temp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}
    env.update(TMPDIR=str(temp), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "multimodal", "demo", "--model", str(checkpoint), "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, (tmp / "server.log").read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port, temp
        except OSError:
            assert time.monotonic() < deadline, "the demo did not start"
            time.sleep(0.3)


def test_errors_name_the_users_file_and_sigterm_cleans_up(checkpoint, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    good = tmp_path / "my photo.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(good)
    broken = tmp_path / "holiday.png"
    broken.write_bytes(b"these bytes are no picture" * 20)
    proc, port, temp = _start(checkpoint, tmp_path)
    try:
        client = Client(f"http://127.0.0.1:{port}", verbose=False, download_files=False)
        out = client.predict(handle_file(str(good)), None, "a red circle", None, [], 0, "all tokens (mean)",
                             api_name="/run")
        assert out[0].startswith("Ran on")
        with pytest.raises(AppError) as err:
            client.predict(handle_file(str(broken)), None, "a red circle", None, [], 0, "all tokens (mean)",
                           api_name="/run")
        message = str(err.value)
        assert "holiday.png" in message and str(temp) not in message and "gradio" not in message, message
        written = [p for p in temp.rglob("*") if p.is_file()]
        assert any("multimodal-demo-" in str(p) for p in written)  # a request's outputs were there
        assert any(p.name == "my photo.png" for p in written)  # and gradio's copy of the upload
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    left = [str(p.relative_to(temp)) for p in temp.rglob("*") if p.is_file()]
    assert code == 0, (tmp_path / "server.log").read_text()
    assert left == [], f"left behind after SIGTERM: {left[:10]}"
