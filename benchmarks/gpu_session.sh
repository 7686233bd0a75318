#!/usr/bin/env bash
# The GPU measurements, prepared as one command for a session that is lent a GPU (the device tool):
#
#     run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
#
# It uses the machine's own python3 (torch, timm and transformers are there; gradio is not, so the demo's
# latency is not measured) with this checkout on PYTHONPATH and HF_HUB_OFFLINE=1, and writes under $OUT
# (./gpu-out when unset). Each part has its own time limit, so a slow part cannot eat the next:
#   env.txt          the GPU and the library versions
#   benchmarks.txt   fusion maps overhead, sparsemax / entmax15, the training step, each on CUDA
#   train.txt        `train --preset default` on CUDA: its heartbeat lines (time a step) and, when it
#                    finishes within TRAIN_S, train_summary.json's wall time and a 500-scene eval
#   study.tar.gz     STUDY's folder without checkpoints (report.md, results.json, runs/*/done.json, logs),
#                    written from the runs finished within the time left; its results.json carries them
#                    to a CPU machine: `multimodal compare STUDY --reuse FOLDER` there copies them
# Settings (environment): BUDGET (s, whole script, default 540), TRAIN_S (default 240), STUDY (default
# competition: 6 runs to train, its 3 default-point runs copied from the size report), WORKERS (default 4).
# CPU dry run of the plumbing: SMOKE=1 bash benchmarks/gpu_session.sh (tiny settings, no GPU needed).
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-540}
TRAIN_S=${TRAIN_S:-240}
STUDY=${STUDY:-competition}
WORKERS=${WORKERS:-4}
SMOKE=${SMOKE:-0}
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
say() { echo "[$(($(date +%s) - START)) s] $*"; }
# a part stopped at its limit gets Ctrl-C first (training and studies keep what they finished), then KILL
limited() { local s=$1; shift; timeout -s INT -k 20 "$s" "$@"; }

{
    nvidia-smi -L 2>&1 || echo "no nvidia-smi"
    "$PY" -c 'import sys, torch, timm, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "| timm", timm.__version__,
      "| transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
    nproc
} > "$OUT/env.txt" 2>&1
say "$(tr '\n' ' ' < "$OUT/env.txt")"

if [ "$SMOKE" = 1 ]; then
    BENCH=(--reps 2)
    TRAIN=(--preset smoke --set steps=4)
    EVAL=(--scenes 8 --no-baselines)
    STUDY_ARGS=(--reuse multimodal/studies/reports/size --dry-run)
else
    BENCH=()
    TRAIN=(--preset default)
    EVAL=(--scenes 500)
    STUDY_ARGS=(--reuse multimodal/studies/reports/size)
fi

say "benchmarks"
{
    limited 60 "$PY" benchmarks/fusion_overhead.py --allocator current "${BENCH[@]}"
    limited 60 "$PY" benchmarks/sparse_attention.py "${BENCH[@]}"
    limited 90 "$PY" benchmarks/train_step.py --run-steps 0 "${BENCH[@]}"
} > "$OUT/benchmarks.txt" 2>&1
tail -n 3 "$OUT/benchmarks.txt"

say "train ${TRAIN[*]} (at most $TRAIN_S s)"
T0=$(date +%s)
limited "$TRAIN_S" "$PY" -m multimodal train "${TRAIN[@]}" --out /tmp/gpu-train > "$OUT/train.txt" 2>&1
echo "exit $? after $(($(date +%s) - T0)) s wall" >> "$OUT/train.txt"
if [ -f /tmp/gpu-train/train_summary.json ]; then
    cp /tmp/gpu-train/train_summary.json "$OUT/"
    limited 120 "$PY" -m multimodal eval --model /tmp/gpu-train "${EVAL[@]}" --out /tmp/gpu-eval >> "$OUT/train.txt" 2>&1
fi
tail -n 2 "$OUT/train.txt"

S=$(($(left) - 40))
say "study $STUDY (at most $S s, --workers $WORKERS)"
if [ "$S" -gt 30 ]; then
    limited "$S" "$PY" -m multimodal compare "$STUDY" --out /tmp/gpu-study --workers "$WORKERS" --quiet \
        "${STUDY_ARGS[@]}" > "$OUT/study.txt" 2>&1
    echo "exit $? after $(($(date +%s) - START)) s of the script" >> "$OUT/study.txt"
    if [ "$SMOKE" != 1 ]; then
        limited 30 "$PY" -m multimodal compare "$STUDY" --out /tmp/gpu-study --report-only --quiet >> "$OUT/study.txt" 2>&1
    fi
    [ -d /tmp/gpu-study ] && tar -czf "$OUT/study.tar.gz" -C /tmp --exclude='*/model' --exclude='*/snapshots' gpu-study
fi
tail -n 3 "$OUT/study.txt" 2>/dev/null
say "done: $(ls "$OUT" | tr '\n' ' ')"
