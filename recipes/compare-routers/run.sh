#!/usr/bin/env bash
# Train every run of this comparison one after another, then compare them.
#   [SETS="e16 e4"] [SEEDS="1234 1 2"] bash recipes/compare-routers/run.sh [OUT_DIR]
#   (default OUT_DIR: docs/results/compare-routers). With SEEDS, each config runs once per seed (run.seed; folders
#   NAME-sSEED) and `hashmoe compare` reports the seeds of one config as mean ± std; without, once with the
#   recipe's seed (folders NAME).
# Runs that already finished (summary.json present) are skipped, so the script can be re-run after an
# interruption; an unfinished run resumes from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."
HASHMOE=${HASHMOE:-.venv/bin/hashmoe}
OUT=${1:-docs/results/compare-routers}
source recipes/train-seeds.sh
# dense and the 16-expert set first, then the 4-expert set; SETS="e16" runs only the first part
configs=(recipes/compare-routers/dense.yaml)
for set in ${SETS:-e16 e4}; do
    configs+=(recipes/compare-routers/*-"$set".yaml)
done
run_dirs=()
for config in "${configs[@]}"; do
    train_for_seeds "$config" runs/compare-routers
done
"$HASHMOE" compare "${run_dirs[@]}" --out "$OUT"
