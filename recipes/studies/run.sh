#!/usr/bin/env bash
# Train the runs of each miniature study one after another, then compare each study's runs.
#   [STUDIES="ladder hash-ladder staircase doping ladder-lr staircase-lr walk256"] bash recipes/studies/run.sh [OUT_ROOT]
# OUT_ROOT defaults to docs/results/studies; each study writes OUT_ROOT/<study>/report.md and its plots.
# SEEDS="1234 1 2" trains each run once per seed (run.seed; folders NAME-sSEED); compare reports mean ± std.
# MAX_STEPS=N trains every run for N steps (folders NAME-Nsteps-sSEED; reports in OUT_ROOT/<study>-Nsteps).
# Study (d)'s blanked form trains in phases: recipes/studies/walkhide-curriculum.sh.
# Runs that already finished (summary.json present) are skipped, and runs shared by two studies are trained
# once, so the script can be re-run after an interruption.
set -euo pipefail
cd "$(dirname "$0")/../.."
HASHMOE=${HASHMOE:-.venv/bin/hashmoe}
OUT_ROOT=${1:-docs/results/studies}
source recipes/train-seeds.sh
declare -A STUDY_RUNS=(
    [ladder]="dense-l2 ladder2-l2 dense-l4"
    [hash-ladder]="dense-l2 hash-l2 ladder2-l2 hash-ladder2-l2"
    [staircase]="walk-plain walk-ladder4 walk-staircase walk-staircase-cached"
    [doping]="ff256 ff256-frozen768 ff1024 ff1024-monarch"
    [ladder-lr]="dense-l2 ladder2-l2 dense-l2-lr1e-3 ladder2-l2-lr1e-3"
    [staircase-lr]="walk-plain walk-staircase walk-staircase-lr1e-3"
    [walk256]="walk256-staircase walk256-plain walk256-chunk32 walk256-dense-l8"
)
for study in ${STUDIES:-ladder hash-ladder staircase doping ladder-lr staircase-lr walk256}; do
    if [ -z "${STUDY_RUNS[$study]:-}" ]; then
        echo "unknown study '$study'; studies: ${!STUDY_RUNS[*]}" >&2
        exit 2
    fi
    run_dirs=()
    for recipe in ${STUDY_RUNS[$study]}; do
        train_for_seeds "recipes/studies/$recipe.yaml" runs/studies "$study / "
    done
    # --labels config with seeds: runs of one recipe differ only by run.seed and are grouped
    "$HASHMOE" compare "${run_dirs[@]}" --labels "$([ -n "${SEEDS:-}" ] && echo config || echo name)" \
        --out "$OUT_ROOT/$study${MAX_STEPS:+-${MAX_STEPS}steps}"
done
