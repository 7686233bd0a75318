#!/usr/bin/env bash
# What a session lent a GPU runs, prepared as one command for the device tool. First, here (once a session,
# needs pip's index): `bash benchmarks/gpu_wheels.sh` puts the wheels the device image lacks or has at other
# versions (soundfile, timm, transformers: its own fail to import this package) in .whl; then
#
#     run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# It uses the machine's own python3 and torch with those wheels and this checkout on PYTHONPATH,
# HF_HUB_OFFLINE=1, and writes under $OUT (./gpu-out when unset):
#   logs.tar.gz      env.txt (GPU, versions, cores), gate.txt, monitor.txt (every 20 s: GPU use and memory,
#                    the machine's memory, runs trained), studies.txt, and each run's log.txt
#   models-N.tar.gz  the trained runs' model folders (weights, config, train summary; no optimiser state), two
#                    a file (16 MB a file, 64 MB in all come back: 8 models). Unpack them into the study's
#                    folder here and run `multimodal compare STUDY --out THAT_FOLDER --reuse
#                    multimodal/studies/reports/size --reuse multimodal/studies/reports/competition
#                    --workers 2`: it analyses them (about 3 min a run at one thread) without training again.
# The studies train side by side with --train-only until BUDGET - 60 s: each chain
# "STUDY[,STUDY...]:CORES:WORKERS" of STUDIES runs pinned to its cores (taskset). The GPU does the training
# alone because evaluation and analysis after it did not fit: on 2026-12-04, 12 runs side by side kept the H200
# at 99% and trained at 0.28 s a step each (1600 steps in about 450 s), and none had finished its analysis
# 40 s later. So 8 at a time (the models that can come back), about 0.19 s a step if the GPU stays the limit.
# Beside the studies' first minutes, a 2-run study of the default's architecture (4 steps, checkpoints,
# snapshots, --workers 2) goes through training, eval and analysis on the device: if it fails, everything
# stops, so a bug costs a minute of device time, not the call.
# Settings (environment): BUDGET (s, the whole script, default 575), STUDIES (not training_dynamics: its
# snapshots, 7.6 MB each, do not come back).
# CPU dry run of the plumbing: SMOKE=1 bash benchmarks/gpu_session.sh (the studies --dry-run, no GPU needed).
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-575}
# 8 runs at a time on 16 cores (the models that can come back): positional's 3 and queries' 3 (their base point
# is copied from size) and task variety's first 2 (the rest of it waits). Competition is done on the CPU.
STUDIES=${STUDIES:-"positional:0-5:3 queries:6-11:3 task_variety:12-15:2"}
if ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
SMOKE=${SMOKE:-0}
WORK=${WORK:-/tmp/gpu-session}
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
say() { echo "[$(($(date +%s) - START)) s] $*"; }
# a part stopped at its limit gets Ctrl-C first (training and studies keep what they finished), then KILL
limited() { local s=$1; shift; timeout -s INT -k 20 "$s" "$@"; }
rm -rf "$WORK" && mkdir -p "$WORK/studies"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOGS=$WORK/logs
mkdir -p "$LOGS"

{
    nvidia-smi -L 2>&1 || echo "no nvidia-smi"
    "$PY" -c 'import os, sys, torch, timm, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "| timm", timm.__version__,
      "| transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("cores", os.cpu_count(), "usable", len(os.sched_getaffinity(0)))'
    free -g | head -2
    command -v taskset || echo "no taskset"
} > "$LOGS/env.txt" 2>&1
say "$(tr '\n' ' ' < "$LOGS/env.txt")"

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
        done_runs=$(ls "$WORK"/studies/*/runs/*/model/train_summary.json 2> /dev/null | wc -l)
        gpu=$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2> /dev/null | tr '\n' ' ')
        mem=$(free -g | awk 'NR==2 {print $3 " of " $2 " GB"}')
        echo "[$(($(date +%s) - START)) s] gpu $gpu| mem $mem | runs trained $done_runs"
        sleep 20
    done
) > "$LOGS/monitor.txt" 2>&1 &
MONITOR=$!

chain() {  # STUDY[,STUDY...] CORES WORKERS: one study after another on those cores
    local studies=$1 cores=$2 workers=$3 extra=() pin=()
    [ "$SMOKE" = 1 ] && extra=(--dry-run)
    command -v taskset > /dev/null && taskset -c "$cores" true 2> /dev/null && pin=(taskset -c "$cores")
    for st in ${studies//,/ }; do
        local own=()  # the study's own committed report: its runs on this recipe are carried over, not retrained
        [ -f "multimodal/studies/reports/$st/results.json" ] && own=(--reuse "multimodal/studies/reports/$st")
        "${pin[@]}" "$PY" -m multimodal compare "$st" --out "$WORK/studies/$st" --workers "$workers" --quiet \
            --train-only --reuse multimodal/studies/reports/size --reuse multimodal/studies/reports/competition \
            "${own[@]}" "${extra[@]}" 2>&1 | sed -u "s/^/[$st] /"
    done
}
export -f chain
export PY WORK SMOKE
S=$(($(left) - 60))
say "studies for $S s: $STUDIES"
pids=()
for spec in $STUDIES; do
    IFS=: read -r studies cores workers <<< "$spec"
    limited "$S" bash -c "chain '$studies' '$cores' '$workers'" >> "$LOGS/studies.txt" 2>&1 &
    pids+=($!)
done

# the gate, beside them: if it fails, everything stops
limited 150 "$PY" -m multimodal compare "$WORK/gate.toml" --out "$WORK/gate" --workers 2 --quiet > "$LOGS/gate.txt" 2>&1
gate=$?
echo "gate exit $gate after $(($(date +%s) - START)) s" >> "$LOGS/gate.txt"
if [ "$gate" = 124 ] || [ "$gate" = 137 ]; then
    say "the gate ran out of its time beside the studies (no failure seen): going on"
elif [ "$gate" != 0 ] || grep -q FAILED "$LOGS/gate.txt"; then
    cat "$WORK"/gate/runs/*/error.txt >> "$LOGS/gate.txt" 2> /dev/null
    kill -TERM "${pids[@]}" "$MONITOR" 2> /dev/null
    wait
    tail -n 40 "$LOGS/gate.txt"
    tail -n 20 "$LOGS/studies.txt"
    say "the gate failed: stopped everything"
    exit 3
else
    say "gate passed: $(tail -n 2 "$LOGS/gate.txt" | tr '\n' ' ')"
fi
wait "${pids[@]}"
kill "$MONITOR" 2> /dev/null

say "studies stopped"
models=()
for m in "$WORK"/studies/*/runs/*/model/train_summary.json; do
    [ -f "$m" ] && models+=("$(dirname "${m#"$WORK"/}")")
done
say "${#models[@]} runs trained: ${models[*]}"
for ((i = 0; i < ${#models[@]} && i < 8; i += 2)); do
    tar -czf "$OUT/models-$((i / 2)).tar.gz" -C "$WORK" --exclude='train_state*' --exclude=snapshots "${models[@]:i:2}"
done
[ "${#models[@]}" -gt 8 ] && say "trained but not brought back (64 MB come back): ${models[*]:8}"
grep -E "trained$|FAILED|trained [0-9]" "$LOGS/studies.txt" | tail -n 20
tail -n 3 "$LOGS/monitor.txt"

if [ "$(left)" -gt 60 ]; then
    say "benchmarks"
    BENCH=()
    [ "$SMOKE" = 1 ] && BENCH=(--reps 2)
    {
        limited 25 "$PY" benchmarks/fusion_overhead.py --allocator current "${BENCH[@]}"
        limited 25 "$PY" benchmarks/sparse_attention.py "${BENCH[@]}"
    } > "$LOGS/benchmarks.txt" 2>&1
    tail -n 4 "$LOGS/benchmarks.txt"
fi
(cd "$WORK" && find studies -name log.txt -exec cp --parents {} logs \;)
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
say "done: $(ls "$OUT" | tr '\n' ' ')"
