#!/usr/bin/env bash
# Set up (idempotent) and launch the Gradio demo on the embedded default model (assets/default).
# The README's first quick-start command. Extra arguments go to `multimodal demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash requirements/setup.sh  # .venv from requirements/lock-cpu.txt, then the torch-trio check
# No network at run time; glibc reuses freed blocks instead of zeroing fresh pages for every
# map (see benchmarks/fusion_overhead.py: this is what keeps maps nearly free).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296
exec .venv/bin/python -m multimodal demo "$@"
