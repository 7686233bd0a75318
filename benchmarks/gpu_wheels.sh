#!/usr/bin/env bash
# The wheels benchmarks/gpu_session.sh carries to the device machine (run here, once a session: it needs
# pip's index). The device image holds torch, numpy, safetensors and the rest, but not soundfile (nor cffi
# under it), and its timm (1.0.29) and transformers (5.17) are older than this package needs: its timm lacks
# timm.data.resolve_input_data_config. So: those five at the versions of requirements/lock-cpu.txt, built for
# the device's Python 3.12 on x86-64, into .whl (ignored by git through .git/info/exclude).
set -eu
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qx "/.whl/" .git/info/exclude 2> /dev/null || echo "/.whl/" >> .git/info/exclude
pins=$(grep -E "^(soundfile|cffi|pycparser|timm|transformers)==" requirements/lock-cpu.txt | cut -d' ' -f1)
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl $pins
ls .whl
