#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. The README's second quick-start command.
set -euo pipefail
cd "$(dirname "$0")/.."
# The browser test drives Debian's Chromium through Playwright (no browser download).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
bash requirements/setup.sh dev  # .venv from requirements/lock-cpu.txt, then the torch-trio check
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False MULTIMODAL_REQUIRE_BROWSER=1
exec .venv/bin/python -m pytest "$@"
