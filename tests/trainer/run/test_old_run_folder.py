"""A run folder written by an earlier hashmoe resumes as before: tests/fixtures/run-before-by-concern/ was
trained (2 ranks, ep_size 2, 4 steps, a checkpoint at step 4) by the trainer as it stood before trainer/ moved
into one folder per concern (`hashmoe launch tests/fixtures/run-before-by-concern.yaml --nproc 2`, commit
38444b9), and is kept byte for byte. Its data is a generated task, rebuilt here into the same store."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.trainer.harness import ROOT, check, run, train_rows

pytestmark = pytest.mark.slow

FIXTURE = ROOT / "tests" / "fixtures" / "run-before-by-concern"


def test_a_run_folder_from_before_the_move_resumes_and_trains_on(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE, run_dir)
    config = yaml.safe_load((ROOT / "tests" / "fixtures" / "run-before-by-concern.yaml").read_text())
    config["run"]["output_dir"], config["data"]["cache_dir"] = str(run_dir), str(tmp_path / "cache")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = check(run([sys.executable, "-m", "trainer.cli", "launch", str(path), "--nproc", "2",
                        "--set", "optim.max_steps=6", "--allow-config-change"]))
    assert f"resuming from {run_dir / 'checkpoints' / 'step_4'} (step 4)" in result.stdout, result.stdout
    assert "finished at step 6" in result.stdout
    rows = train_rows(run_dir)
    assert sorted(rows) == list(range(1, 7))
    before = train_rows(FIXTURE)
    assert all(rows[step]["train/loss"] == before[step]["train/loss"] for step in range(1, 5))  # kept as written
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_6"
    assert Path(run_dir / "config_changes.jsonl").read_text().count('"optim.max_steps"') == 1
