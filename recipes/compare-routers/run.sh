#!/usr/bin/env bash
# Train every run of this comparison one after another, then compare them.
#   [SETS="e16 e4"] bash recipes/compare-routers/run.sh [OUT_DIR]   (default: docs/results/compare-routers)
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
for config in "${configs[@]}"; do
    name=$(basename "$config" .yaml)
    run_dir=runs/compare-routers/$name
    runs+=("$run_dir")
    if [ -f "$run_dir/summary.json" ]; then
        echo "== $name: done already"
        continue
    fi
    echo "== $name"
    start=$(date +%s)
    "$HASHMOE" train "$config"
    echo "== $name: $(( $(date +%s) - start )) s"
done
"$HASHMOE" compare "${runs[@]}" --out "$OUT"
