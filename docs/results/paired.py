"""Paired differences across seeds: for each config, (ppl - baseline ppl) / baseline ppl per seed, at each shared
evaluation step; runs of one seed share the data order and differ in the model, so the pair removes most of the
seed-to-seed spread. Usage: python docs/results/paired.py BASELINE_PREFIX RUNS_DIR CONFIG_PREFIX... (seeds from -sSEED)"""
import json
import statistics
import sys
from pathlib import Path


def valid(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["valid/ppl"] for r in rows if "valid/ppl" in r}


def main(baseline: str, runs_dir: str, *configs: str) -> None:
    runs = Path(runs_dir)
    seeds = sorted(p.name.rsplit("-s", 1)[1] for p in runs.glob(f"{baseline}-s*") if p.is_dir())
    base = {s: valid(runs / f"{baseline}-s{s}") for s in seeds}
    print(f"| config | final ppl per seed ({', '.join(seeds)}) | vs {baseline}, paired, mean ± std (n) | "
          f"seeds better than {baseline} |")
    print("|---|---|---|---|")
    for config in (baseline, *configs):
        ppl = {s: valid(runs / f"{config}-s{s}") for s in seeds if (runs / f"{config}-s{s}").is_dir()}
        finals = {s: v[max(v)] for s, v in ppl.items() if v}
        rel = [100 * (finals[s] / base[s][max(base[s])] - 1) for s in finals]
        spread = statistics.stdev(rel) if len(rel) > 1 else 0.0
        better = sum(r < 0 for r in rel)
        print(f"| {config} | {' / '.join(f'{finals[s]:.1f}' for s in finals)} | "
              f"{statistics.mean(rel):+.1f}% ± {spread:.1f} ({len(rel)}) | {better} of {len(rel)} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
