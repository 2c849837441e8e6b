#!/usr/bin/env bash
# Train every run of this comparison one after another, then compare them.
#   [SETS="e16 e4"] [SEEDS="1234 1 2"] bash recipes/compare-routers/run.sh [OUT_DIR]
#   (default OUT_DIR: docs/results/compare-routers). Each config runs once per seed (run.seed); `hashmoe compare`
#   reports the seeds of one config as mean ± std.
# Runs that already finished (summary.json present) are skipped, so the script can be re-run after an
# interruption; an unfinished run resumes from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."
HASHMOE=${HASHMOE:-.venv/bin/hashmoe}
OUT=${1:-docs/results/compare-routers}
runs=()
# dense and the 16-expert set first, then the 4-expert set; SETS="e16" runs only the first part
configs=(recipes/compare-routers/dense.yaml)
for set in ${SETS:-e16 e4}; do
    configs+=(recipes/compare-routers/*-"$set".yaml)
done
seeds=(${SEEDS:-1234})
for config in "${configs[@]}"; do
    for seed in "${seeds[@]}"; do
        name=$(basename "$config" .yaml)
        # one seed keeps the historical folder name; more seeds get one folder each
        [ ${#seeds[@]} -gt 1 ] && name=$name-s$seed
        run_dir=runs/compare-routers/$name
        runs+=("$run_dir")
        if [ -f "$run_dir/summary.json" ]; then
            echo "== $name: done already"
            continue
        fi
        echo "== $name"
        start=$(date +%s)
        "$HASHMOE" train "$config" --output "$run_dir" --set run.seed="$seed" --set run.name="$name"
        echo "== $name: $(( $(date +%s) - start )) s"
    done
done
"$HASHMOE" compare "${runs[@]}" --out "$OUT"
