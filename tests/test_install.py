"""The quick start's install: the lock covers what the project needs, and the environment check
passes on a good environment and names the versions and the fix on a broken one."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock-cpu.txt"
CHECK = ROOT / "requirements" / "check_env.py"


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.split(";")[0].strip().partition("==")
            assert sep, f"every line of the lock pins one version: {line!r}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _requirement_name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", req)[0]).lower()


def test_the_lock_pins_the_torch_trio_and_every_requirement():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
        assert _requirement_name(req) in pins, f"{req} is not in the lock: run requirements/refresh-lock.sh"
    trio = {r.split("==")[0]: r.split("==")[1] for r in project["dependencies"] if r.startswith("torch")}
    assert set(trio) == {"torch", "torchvision", "torchaudio"}, "the torch trio is pinned exactly in pyproject.toml"
    assert all(pins[name] == version for name, version in trio.items())


def test_this_environment_is_the_locked_one():
    """Every locked package that is installed here has the locked version (a stale .venv fails)."""
    wrong = {}
    for name, version in _lock().items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if have != version:
            wrong[name] = (have, version)
    assert not wrong, f"installed vs locked: {wrong}; rm -rf .venv and run bash tests/run.sh"


def test_environment_check_passes_here():
    out = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"torchaudio {metadata.version('torchaudio')}" in out.stdout and "torchaudio OK" in out.stdout


def test_environment_check_names_versions_and_the_fix_when_torchaudio_does_not_load(tmp_path):
    fake = tmp_path / "torchaudio"  # shadows the real package, fails to load as a bad build does
    fake.mkdir()
    (fake / "__init__.py").write_text("raise OSError('libtorchaudio.so: undefined symbol: "
                                      "torch_exception_get_what_without_backtrace')\n")
    out = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 1 and out.stdout == ""
    msg = out.stderr
    assert "undefined symbol" in msg and "Traceback" not in msg
    assert f"found:  torch {metadata.version('torch')}" in msg
    assert f"torchaudio {_lock()['torchaudio']}" in msg.split("locked:")[1]
    assert "rm -rf .venv" in msg
