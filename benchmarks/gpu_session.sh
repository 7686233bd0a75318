#!/usr/bin/env bash
# What a session lent a GPU runs, prepared as one command for the device tool:
#
#     run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
#
# It uses the machine's own python3 (torch, timm and transformers are there; gradio is not, so the demo's
# latency is not measured) with this checkout on PYTHONPATH and HF_HUB_OFFLINE=1, and writes under $OUT
# (./gpu-out when unset):
#   env.txt          the GPU, the library versions, the cores
#   studies.txt      the studies side by side until BUDGET - 75 s: each chain "STUDY[,STUDY...]:CORES:WORKERS" of
#                    STUDIES runs pinned to its cores (taskset), one study after another; every study copies the
#                    default's point from the committed size report (--reuse), then writes its report from the
#                    runs it finished. Their runs' log.txt give the time a step with the GPU shared.
#   gate.txt         beside the studies' first minutes, a 2-run study of the default's architecture (4 steps,
#                    checkpoints, snapshots, --workers 2) through training, eval and analysis on this device:
#                    if it fails, everything stops there, so a bug costs a minute of device time, not the call
#   monitor.txt      every 20 s: GPU use and memory, the machine's memory, runs finished
#   studies.tar.gz   the study folders without checkpoints (report.md, results.json, runs/*/done.json and
#                    log.txt); on a CPU machine `multimodal compare STUDY --reuse FOLDER` copies their runs
#   benchmarks.txt   fusion maps overhead and sparsemax / entmax15 on CUDA, when 60 s are left
# Settings (environment): BUDGET (s, the whole script, default 560), STUDIES.
# CPU dry run of the plumbing: SMOKE=1 bash benchmarks/gpu_session.sh (the studies --dry-run, no GPU needed).
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-560}
# 12 runs at a time on 16 cores (a default-recipe run holds up to 7 GB of scenes in memory)
STUDIES=${STUDIES:-"size,training_dynamics:0-3:2 competition,queries:4-9:6 task_variety,positional:10-15:4"}
SMOKE=${SMOKE:-0}
WORK=${WORK:-/tmp/gpu-session}
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
say() { echo "[$(($(date +%s) - START)) s] $*"; }
# a part stopped at its limit gets Ctrl-C first (training and studies keep what they finished), then KILL
limited() { local s=$1; shift; timeout -s INT -k 20 "$s" "$@"; }
rm -rf "$WORK" && mkdir -p "$WORK/studies"

{
    nvidia-smi -L 2>&1 || echo "no nvidia-smi"
    "$PY" -c 'import os, sys, torch, timm, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "| timm", timm.__version__,
      "| transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("cores", os.cpu_count(), "usable", len(os.sched_getaffinity(0)))'
    free -g | head -2
    command -v taskset || echo "no taskset"
} > "$OUT/env.txt" 2>&1
say "$(tr '\n' ' ' < "$OUT/env.txt")"

cat > "$WORK/gate.toml" << 'TOML'
name = "gpu_gate"
question = "Does a study of the default's architecture run on this device?"
seeds = [0]
eval_scenes = 8
analysis_scenes = 4
shapley_permutations = 2
snapshots = [0, 2, 4]
grounded_pointing = 0.85

[base]
preset = "default-2026-12-03"
steps = 4
pool_scenes = 96
val_scenes = 32
curriculum_steps = 2
checkpoint_every = 2
eval_every = 1000

[grid]
"fusion.heads" = [2, 4]
TOML

(
    while true; do
        done_runs=$(ls "$WORK"/studies/*/runs/*/done.json 2> /dev/null | wc -l)
        gpu=$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2> /dev/null | tr '\n' ' ')
        mem=$(free -g | awk 'NR==2 {print $3 " of " $2 " GB"}')
        echo "[$(($(date +%s) - START)) s] gpu $gpu| mem $mem | done.json $done_runs"
        sleep 20
    done
) > "$OUT/monitor.txt" 2>&1 &
MONITOR=$!

chain() {  # STUDY[,STUDY...] CORES WORKERS: one study after another on those cores
    local studies=$1 cores=$2 workers=$3 extra=() pin=()
    [ "$SMOKE" = 1 ] && extra=(--dry-run)
    command -v taskset > /dev/null && taskset -c "$cores" true 2> /dev/null && pin=(taskset -c "$cores")
    for st in ${studies//,/ }; do
        "${pin[@]}" "$PY" -m multimodal compare "$st" --out "$WORK/studies/$st" --workers "$workers" --quiet \
            --reuse multimodal/studies/reports/size "${extra[@]}" 2>&1 | sed -u "s/^/[$st] /"
    done
}
export -f chain
export PY WORK SMOKE
S=$(($(left) - 75))
say "studies for $S s: $STUDIES"
pids=()
for spec in $STUDIES; do
    IFS=: read -r studies cores workers <<< "$spec"
    limited "$S" bash -c "chain '$studies' '$cores' '$workers'" >> "$OUT/studies.txt" 2>&1 &
    pids+=($!)
done

# the gate, beside them: if it fails, everything stops
limited 150 "$PY" -m multimodal compare "$WORK/gate.toml" --out "$WORK/gate" --workers 2 --quiet > "$OUT/gate.txt" 2>&1
gate=$?
echo "gate exit $gate after $(($(date +%s) - START)) s" >> "$OUT/gate.txt"
if [ "$gate" = 124 ] || [ "$gate" = 137 ]; then
    say "the gate ran out of its time beside the studies (no failure seen): going on"
elif [ "$gate" != 0 ] || grep -q FAILED "$OUT/gate.txt"; then
    cat "$WORK"/gate/runs/*/error.txt >> "$OUT/gate.txt" 2> /dev/null
    kill -TERM "${pids[@]}" "$MONITOR" 2> /dev/null
    wait
    tail -n 40 "$OUT/gate.txt"
    tail -n 20 "$OUT/studies.txt"
    say "the gate failed: stopped everything"
    exit 3
else
    say "gate passed: $(tail -n 2 "$OUT/gate.txt" | tr '\n' ' ')"
fi
wait "${pids[@]}"
kill "$MONITOR" 2> /dev/null

say "studies stopped; reports from the runs finished"
for spec in $STUDIES; do
    IFS=: read -r studies cores workers <<< "$spec"
    for st in ${studies//,/ }; do
        [ -d "$WORK/studies/$st" ] || continue
        limited 40 "$PY" -m multimodal compare "$st" --out "$WORK/studies/$st" --report-only --quiet \
            --reuse multimodal/studies/reports/size 2>&1 | sed -u "s/^/[$st report] /" >> "$OUT/studies.txt" &
    done
done
wait
tar -czf "$OUT/studies.tar.gz" -C "$WORK" --exclude='*/model' --exclude='*/snapshots' studies
grep -E "done$|FAILED|ran [0-9]" "$OUT/studies.txt" | tail -n 20
tail -n 3 "$OUT/monitor.txt"

if [ "$(left)" -gt 60 ]; then
    say "benchmarks"
    BENCH=()
    [ "$SMOKE" = 1 ] && BENCH=(--reps 2)
    {
        limited 25 "$PY" benchmarks/fusion_overhead.py --allocator current "${BENCH[@]}"
        limited 25 "$PY" benchmarks/sparse_attention.py "${BENCH[@]}"
    } > "$OUT/benchmarks.txt" 2>&1
    tail -n 4 "$OUT/benchmarks.txt"
fi
say "done: $(ls "$OUT" | tr '\n' ' ')"
