"""The package stands on its own: its wheel, installed into a fresh virtual environment, runs the
main jobs from a folder outside the checkout.

The wheel is built offline from this checkout; the fresh environment reuses the locked packages
already installed in the test environment (linked in, no network, no index) and gets the wheel
itself by `pip install --no-index`, so pip checks that the wheel's requirements are satisfied by
the lock. Then, from an empty folder: `multimodal maps --sample` and `multimodal demo`, answering
one request through gradio_client.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST = "multimodal_attention_sandbox"  # the distribution's name in file names


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


def _clean_env() -> dict[str, str]:
    """The environment a user's shell would have: nothing pointing back into the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PIP_NO_INDEX="1")
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a clean copy: a stale build/ in the checkout must not leak into the wheel
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                             "out", "runs", "reports", "test-artifacts"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(out), str(src)], env=_clean_env())
    (path,) = out.glob(f"{DIST}-*.whl")
    return path


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    """A new venv holding the locked packages (links to the test venv's) and the installed wheel."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", str(venv)])
    site = Path(_run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
                .stdout.strip())
    ours = Path(sysconfig.get_path("purelib"))
    skip = re.compile(rf"^(__editable__|{DIST}|multimodal|_multimodal|__pycache__)", re.I)
    for entry in ours.iterdir():
        if not skip.match(entry.name) and not (site / entry.name).exists():  # the new venv's own pip stays
            (site / entry.name).symlink_to(entry)
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", str(wheel)], env=_clean_env())
    return venv


def test_wheel_holds_every_module_and_the_bundled_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "multimodal").rglob("*.py")}
    assert modules - names == set(), "modules missing from the wheel: list their packages in pyproject.toml"
    assets = {f"multimodal/assets/{p.relative_to(ROOT / 'assets').as_posix()}"
              for p in (ROOT / "assets").rglob("*") if p.is_file()}
    assert assets - names == set(), "bundled files missing from the wheel: see package-data in pyproject.toml"
    data = {p.relative_to(ROOT).as_posix() for p in (ROOT / "multimodal").rglob("*.toml")}  # studies, recipes
    assert data and data - names == set(), "study or recipe files missing from the wheel: see package-data"


def test_installed_wheel_runs_maps_and_the_demo_outside_the_checkout(fresh_venv, tmp_path):
    bin_dir = fresh_venv / "bin"
    env = _clean_env()
    where = _run([str(bin_dir / "python"), "-c", "import multimodal, multimodal.inference as i; "
                  "print(multimodal.__file__); print(i.DEFAULT_CHECKPOINT)"], cwd=tmp_path, env=env).stdout.split()
    assert all(str(fresh_venv) in w and str(ROOT) not in w for w in where), where  # the wheel, not the checkout

    # `multimodal maps` on the packaged sample, with the packaged default model
    _run([str(bin_dir / "multimodal"), "maps", "--sample", "--out", "maps"], cwd=tmp_path, env=env)
    summary = json.loads((tmp_path / "maps" / "summary.json").read_text())
    assert summary["model"] == where[1] and 0.0 <= summary["match_score"] <= 1.0
    assert summary["inputs"]["text"] and (tmp_path / "maps" / "layer0_image.png").stat().st_size > 1000

    # `multimodal demo`, then one request through gradio_client
    from gradio_client import Client, handle_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "demo.log", "w")
    server = subprocess.Popen([str(bin_dir / "multimodal"), "demo", "--port", str(port)], cwd=tmp_path, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, f"the demo exited:\n{(tmp_path / 'demo.log').read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the demo did not start within 180 s"
                time.sleep(0.5)
        assets = Path(where[1]).parent
        client = Client(f"http://127.0.0.1:{port}", verbose=False, download_files=False)
        out = client.predict(handle_file(str(assets / "sample.png")), handle_file(str(assets / "sample.wav")),
                             (assets / "sample.txt").read_text(), handle_file(str(assets / "sample.json")), [], 0,
                             "all tokens (mean)", api_name="/run")
        status, score = out[0], out[1]
        assert status.startswith("Ran on a caption") and "an image of 128x128" in status, status
        assert "pointing image" in out[7]["headers"]  # the sample's packaged ground truth was read
        match = next(c["confidence"] for c in score["confidences"] if c["label"] == "match")
        assert match == pytest.approx(summary["match_score"], abs=1e-4)  # the page and `maps` agree
        assert "the embedded default" in (tmp_path / "demo.log").read_text()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
