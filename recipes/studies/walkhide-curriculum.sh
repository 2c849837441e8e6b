#!/usr/bin/env bash
# Study (d) in miniature: each walkhide-* model trained on the blanked random walk with the blanks raised in
# phases, the same phases, seeds and steps for every model; then `hashmoe compare` and the error by lookback.
#   [SEEDS="1234 1 2"] [MODELS="staircase plain chunk32 dense-l4"] [PHASES="0.01:1500 0.25:3000 0.5:4500 0.75:9000"] \
#   [QUEUES=2] bash recipes/studies/walkhide-curriculum.sh [OUT]
# A phase "H:STEPS" trains with data.task_hide_answers=H up to step STEPS: the first from scratch under the
# recipe's cosine schedule (so its lr has decayed by its end), each later one resumed from the run's last
# checkpoint with a constant lr (--allow-config-change records every change in the run's config_changes.jsonl).
# The first phase blanks a few answers (0.01) so that the blank "_" is in the vocabulary from the start: a
# checkpoint without it cannot be resumed with blanks (its embeddings would not fit).
# Runs go to runs/studies/walkhide-MODEL-sSEED; a phase whose step the run has reached is skipped, so the script
# can be re-run after an interruption. QUEUES runs train side by side, one CPU thread each (on the 2-core
# machine two staircase runs at once made 12.8 + 13.0 updates/s, one alone with 2 threads 16-19).
# OUT (default docs/results/studies/walkhide) gets compare's report.md and plots and lookback.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
HASHMOE=${HASHMOE:-.venv/bin/hashmoe}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-docs/results/studies/walkhide}
SEEDS=${SEEDS:-1234 1 2}
MODELS=${MODELS:-staircase plain chunk32 dense-l4}
PHASES=${PHASES:-0.01:1500 0.25:3000 0.5:4500 0.75:9000}
QUEUES=${QUEUES:-2}
mkdir -p "$OUT"

reached() {  # the step a run folder's last finished training call reached (0 if none)
    "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("step", 0))' "$1/summary.json" \
        2>/dev/null || echo 0
}

train_phases() {  # train_phases MODEL SEED
    local model=$1 seed=$2 name run_dir phase hide steps start
    local -a phases=($PHASES) later
    name=walkhide-$model-s$seed
    run_dir=runs/studies/$name
    for phase in "${phases[@]}"; do
        hide=${phase%%:*} steps=${phase##*:}
        [ "$(reached "$run_dir")" -lt "$steps" ] || continue
        echo "== $name: blanks $hide to step $steps"
        start=$(date +%s)
        later=()
        [ "$phase" = "${phases[0]}" ] || later=(--set optim.schedule=constant)
        OMP_NUM_THREADS=1 "$HASHMOE" train "recipes/studies/walkhide-$model.yaml" --output "$run_dir" \
            --set run.name="$name" --set run.seed="$seed" --set data.task_hide_answers="$hide" \
            --set optim.max_steps="$steps" --allow-config-change "${later[@]}" >> "$run_dir.log" 2>&1 \
            || { echo "$name failed; its log: $run_dir.log" >&2; tail -5 "$run_dir.log" >&2; return 1; }
        echo "== $name: blanks $hide to step $steps done in $(( $(date +%s) - start )) s"
    done
}

jobs_list=()
for model in $MODELS; do
    [ -f "recipes/studies/walkhide-$model.yaml" ] || { echo "no recipe recipes/studies/walkhide-$model.yaml" >&2; exit 2; }
    for seed in $SEEDS; do jobs_list+=("$model $seed"); done
done
mkdir -p runs/studies
for queue in $(seq 0 $((QUEUES - 1))); do
    (
        for i in "${!jobs_list[@]}"; do
            if [ $((i % QUEUES)) = "$queue" ]; then train_phases ${jobs_list[$i]} || exit 1; fi
        done
    ) &
done
failed=0
for queue in $(seq 1 "$QUEUES"); do wait -n || failed=1; done
[ $failed = 0 ] || { echo "a run failed; fix it and re-run: finished phases are kept" >&2; exit 1; }

run_dirs=()
for model in $MODELS; do for seed in $SEEDS; do run_dirs+=("runs/studies/walkhide-$model-s$seed"); done; done
"$HASHMOE" compare "${run_dirs[@]}" --labels config --out "$OUT"
"$PYTHON" docs/results/studies/walk_error_by_lookback.py "${run_dirs[@]}" > "$OUT/lookback.md"
cat "$OUT/lookback.md"
