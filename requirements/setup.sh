#!/usr/bin/env bash
# Run by the two quick-start commands (demos/run.sh, tests/run.sh):
#   bash requirements/setup.sh [EXTRAS]      e.g. `dev` for the test tools
# Makes .venv/ from the lock (requirements/lock-cpu.txt: every package at one tested version) and then
# checks that the torch trio loads and torchaudio computes a filterbank. Idempotent: a venv already
# installed from this lock and this pyproject.toml is not touched again.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/lock-cpu.txt
EXTRAS="${1:-}"
SPEC="."
[ -n "$EXTRAS" ] && SPEC=".[$EXTRAS]"
STAMP=.venv/.installed-from
WANT="$(cat "$LOCK" pyproject.toml | sha256sum | cut -c1-16) $SPEC"
HAVE="$(cat "$STAMP" 2>/dev/null || true)"
# A venv set up with the extras also serves a plain run (the demo after the tests).
if [ ! -x .venv/bin/python ] || { [ "$HAVE" != "$WANT" ] && [ "${HAVE%% *} ." != "$WANT" ]; }; then
  echo "setting up .venv from $LOCK ($SPEC; the first time downloads a few GB) ..." >&2
  python3 -m venv .venv
  .venv/bin/pip install -q "$(grep -E '^pip==' "$LOCK")"
  .venv/bin/pip install -q -c "$LOCK" -e "$SPEC"
  echo "$WANT" > "$STAMP"
fi
.venv/bin/python requirements/check_env.py
