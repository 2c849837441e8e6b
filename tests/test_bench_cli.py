"""`hashmoe bench`: the layer suite's smoke run prints its table and leaves BENCHMARKS.md alone; an unknown
suite is a user error (exit 2). The benchmarks themselves are not tests: their full runs live in
BENCHMARKS.md (see benchmarks/README.md)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "BENCHMARKS.md"
HASHMOE_SCRIPT = Path(sys.executable).parent / "hashmoe"
HASHMOE = [str(HASHMOE_SCRIPT)] if HASHMOE_SCRIPT.is_file() else [sys.executable, "-m", "trainer.cli"]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID",
                      "SLURM_NTASKS", "SLURM_STEP_ID")


def hashmoe(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([*HASHMOE, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def fingerprint(path: Path) -> tuple | None:
    if not path.exists():
        return None
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def test_quick_layer_suite_prints_a_table_and_writes_nothing():
    before = fingerprint(RESULTS)
    result = hashmoe("bench", "--suite", "layer", "--quick")
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table and table[0].startswith("| layer | E | router | ms (median) | ratio vs dense | dropped frac |")
    assert any("dense" in line for line in table[1:]) and any("hash" in line for line in table[1:])
    assert fingerprint(RESULTS) == before, "--quick must not touch BENCHMARKS.md"


def test_unknown_suite_is_a_user_error():
    result = hashmoe("bench", "--suite", "nope")
    assert result.returncode == 2
    assert "--suite" in result.stderr and "nope" in result.stderr and "layer" in result.stderr
