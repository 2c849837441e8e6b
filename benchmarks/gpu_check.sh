#!/usr/bin/env bash
# The one prepared GPU check (issue 14): under 8 minutes on one GPU, it
#   1. runs the layer suite in bf16 on the GPU (appends its section to BENCHMARKS.md),
#   2. trains recipes/tiny.yaml on one GPU with bf16 (ds_configs/zero1_bf16.json) through `hashmoe train`,
#   3. runs the GPU-only tests (those that skip without CUDA),
# and writes what it saw to OUT_DIR (default $OUT, else /tmp/gpu_check): BENCHMARKS.md, the logs, the run's metrics.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Needs python3 with a CUDA torch (the machine's own) and hashmoe's dependencies; wheels in .whl/ (see
# ../.library/device/README.md) are installed into /tmp/site first. Each part runs even if an earlier one
# failed; the exit status is the number of failed parts. CI never runs this.
set -uo pipefail
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
failed=0
part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s"; tail -n 25 "$OUT_DIR/$name.log"
    [ $rc -eq 0 ] || failed=$((failed + 1))
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/gpu.txt" 2>&1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" \
    >> "$OUT_DIR/gpu.txt" 2>&1 || { cat "$OUT_DIR/gpu.txt"; exit 99; }
cat "$OUT_DIR/gpu.txt"

part layer-bf16 240 python3 -m benchmarks.layer --device cuda --dtype bf16 \
    --command "bash benchmarks/gpu_check.sh (python -m benchmarks.layer --device cuda --dtype bf16)"
part train-1gpu 150 python3 -m trainer.cli train recipes/tiny.yaml --output /tmp/gpu_check_run \
    --set parallel.ds_config=zero1_bf16 --set optim.max_steps=60 --set logging.progress=false
cp /tmp/gpu_check_run/metrics.jsonl "$OUT_DIR/train-metrics.jsonl" 2>/dev/null
part gpu-tests 90 python3 -m pytest -q -p no:cacheprovider -rs tests/models/test_experts.py \
    tests/models/test_assignment.py tests/models/test_hashing.py -k cuda
cp BENCHMARKS.md "$OUT_DIR/BENCHMARKS.md"
echo "gpu_check: $failed part(s) failed; results in $OUT_DIR"
exit $failed
