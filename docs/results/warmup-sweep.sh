#!/bin/bash
# The sweep of docs/results/warmup.md: recipes/tiny.yaml, 300 steps, 3 schedules x 3 seeds, one summary line per run.
cd "$(dirname "$0")/../.."
for seed in 1234 1 2; do
for spec in "base|--set optim.warmup_steps=30" "warm100|--set optim.warmup_steps=100" "lr1e-3|--set optim.warmup_steps=30 --set optim.lr=1e-3"; do
  label=${spec%%|*}; args=${spec#*|}
  d=runs/warmup-sweep/$label-s$seed; rm -rf $d
  .venv/bin/hashmoe train recipes/tiny.yaml --output $d --set optim.max_steps=300 --set run.seed=$seed --set logging.log_every=1 --set logging.eval_every=300 --set checkpoint.every=0 --set logging.progress=false $args >/dev/null 2>&1
  python3 - "$d" "$label-s$seed" <<'PY'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1] + '/metrics.jsonl'))]
tr = [r for r in rows if 'train/loss' in r]
L = [r['train/loss'] for r in tr]; G = [r.get('train/grad_norm', 0) for r in tr]
spikes = [(tr[i]['step'], round(L[i], 2), round(G[i], 1)) for i in range(5, len(L) - 1) if L[i] > min(L[i-1], L[i+1]) + 0.5]
v = [r for r in rows if 'valid/loss' in r or 'valid/ppl' in r]
print(f"{sys.argv[2]:20s} valid {v[-1] if v else None}  max_gn {max(G[10:]):.1f} spikes {spikes[:6]}", flush=True)
PY
done; done
