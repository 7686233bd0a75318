#!/usr/bin/env bash
# Re-resolve the quick start's lock: a fresh venv, the newest releases pyproject.toml allows (the torch
# trio is pinned exactly there), the environment check, then every installed package, pinned, into
# requirements/lock-cpu.txt. Run it on purpose (new dependency, wanted upgrade), then run both quick-start
# commands on a fresh clone and commit the lock with what they measured.
#   bash requirements/refresh-lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --upgrade pip
"$tmp/venv/bin/pip" install -q -e ".[dev]"
"$tmp/venv/bin/python" requirements/check_env.py
{
  echo "# The quick start's lock: every package of .venv at one tested version (pip constraints;"
  echo "# requirements/setup.sh installs with -c). Made by requirements/refresh-lock.sh on $(date -u +%F)"
  echo "# with $("$tmp/venv/bin/python" -V) on $(uname -sm). torch comes from the package index as its CUDA"
  echo "# build, which also runs on the CPU (the nvidia-*/cuda-* packages below are its dependencies)."
  "$tmp/venv/bin/pip" freeze --all --exclude-editable | grep -v '^multimodal-attention-sandbox'
} > requirements/lock-cpu.txt
echo "wrote requirements/lock-cpu.txt ($(grep -vc '^#' requirements/lock-cpu.txt) packages)"
