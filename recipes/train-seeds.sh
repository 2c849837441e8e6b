# Sourced by the study scripts (recipes/*/run.sh); defines train_for_seeds. Needs HASHMOE (the hashmoe command).
#   train_for_seeds RECIPE RUN_ROOT [TAG]
# Trains RECIPE once per seed of $SEEDS into RUN_ROOT/NAME-sSEED (run.seed set per run), or once with the
# recipe's own seed into RUN_ROOT/NAME when SEEDS is empty. A run whose folder already has summary.json is
# skipped, so a script can be re-run after an interruption (an unfinished run resumes from its checkpoint).
# MAX_STEPS=N trains every run for N steps instead of its recipe's optim.max_steps, into RUN_ROOT/NAME-Nsteps-sSEED
# (a longer schedule is another run, not a continuation: the cosine lr follows max_steps).
# Appends every run folder to the array run_dirs, for `hashmoe compare`. TAG prefixes the progress lines.
train_for_seeds() {
    local recipe=$1 root=$2 tag=${3:-} base seed name run_dir start
    local -a seeds=(${SEEDS:-})
    base=$(basename "$recipe" .yaml)
    for seed in "${seeds[@]:-}"; do
        name=$base${MAX_STEPS:+-${MAX_STEPS}steps}${seed:+-s$seed}
        run_dir=$root/$name
        run_dirs+=("$run_dir")
        if [ -f "$run_dir/summary.json" ]; then
            echo "== $tag$name: done already"
            continue
        fi
        echo "== $tag$name"
        start=$(date +%s)
        "$HASHMOE" train "$recipe" --output "$run_dir" --set run.name="$name" ${seed:+--set run.seed="$seed"} \
            ${MAX_STEPS:+--set optim.max_steps="$MAX_STEPS"}
        echo "== $tag$name: $(( $(date +%s) - start )) s"
    done
}
