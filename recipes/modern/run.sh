#!/usr/bin/env bash
# Train the modern family (Qwen3-MoE's block with each router) one after another, then compare them.
#   [SEEDS="1234 1 2"] bash recipes/modern/run.sh [OUT_DIR]      (default OUT_DIR: docs/results/modern)
# Finished runs (summary.json present) are skipped; an unfinished run resumes from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/../.."
HASHMOE=${HASHMOE:-.venv/bin/hashmoe}
OUT=${1:-docs/results/modern}
source recipes/train-seeds.sh
run_dirs=()
for name in dense hash v4-layout topk topk-shared switch base; do
    train_for_seeds "recipes/modern/$name.yaml" runs/modern
done
"$HASHMOE" compare "${run_dirs[@]}" --out "$OUT"
