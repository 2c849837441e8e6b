"""`hashmoe slurm` against a real Slurm 22.05 cluster started for this module (tests/trainer/slurm_cluster.py:
munged, slurmctld, two slurmd emulating nodes n1 and n2 on this host). Real sbatch, srun, signals and
`scontrol requeue`; gloo ranks on loopback. Skipped only where the Slurm binaries (or root) are missing."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainer.harness import ROOT, base_config, env_for_run, train_rows, write_config
from tests.trainer.slurm_cluster import SlurmCluster, missing_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))]

MAX_STEPS = 30


@pytest.fixture(scope="session")
def cluster():
    cluster = SlurmCluster().start()
    yield cluster
    cluster.stop()


def write_run(tmp_path: Path, corpus, **overrides) -> tuple[Path, Path]:
    corpus_file, cache = corpus
    run_dir = tmp_path / "run"
    settings = dict(parallel__ep_size=2, optim__max_steps=MAX_STEPS, checkpoint__every=10, logging__eval_every=10)
    config = base_config(run_dir, corpus_file, cache, **{**settings, **overrides})
    return write_config(tmp_path / "run.yaml", config), run_dir


def submit(cluster: SlurmCluster, config: Path, *flags: str) -> str:
    """`hashmoe slurm` as a user runs it (the cluster found through SLURM_CONF); returns the job id."""
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "slurm", str(config), "--gpus-per-node", "0",
                             "--cpus-per-task", "1", *flags], cwd=ROOT, env=cluster.env(env_for_run()),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"submitted job (\d+)", result.stdout)
    assert match and f"squeue -j {match.group(1)}" in result.stdout, result.stdout
    return match.group(1)


def job_log(run_dir: Path, job_id: str) -> str:
    logs = [run_dir / "slurm" / f"{job_id}.{ext}" for ext in ("out", "err")]
    return "\n".join(f"--- {p.name}\n{p.read_text()[-5000:]}" for p in logs if p.is_file())


def finish(cluster: SlurmCluster, job_id: str, run_dir: Path, timeout: float = 150) -> dict:
    try:
        return cluster.wait_for_state(job_id, {"COMPLETED"}, timeout)
    except (RuntimeError, TimeoutError) as err:
        raise AssertionError(f"{err}\n{job_log(run_dir, job_id)}\n{cluster.log('slurmctld')[-2000:]}") from None


def checkpoint_state(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step}" / "hashmoe_state.json").read_text())


def test_two_task_job_trains_to_the_end(cluster, corpus, tmp_path):
    config, run_dir = write_run(tmp_path, corpus)
    job_id = submit(cluster, config, "--ntasks-per-node", "2")
    job = finish(cluster, job_id, run_dir)
    assert job["NumTasks"] == "2" and job["NodeList"] in ("n1", "n2"), job
    log = (run_dir / "slurm" / f"{job_id}.out").read_text()
    assert f"hashmoe: job {job_id} (restart 0)" in log and f"finished at step {MAX_STEPS}" in log, log
    assert sorted(train_rows(run_dir)) == list(range(1, MAX_STEPS + 1))
    assert checkpoint_state(run_dir, MAX_STEPS)["world_size"] == 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS}"


def wait_until_ranks_started(cluster: SlurmCluster, job_id: str, run_dir: Path) -> None:
    """config.yaml is written once every rank has installed its signal handlers and joined the process group;
    the ranks then spend seconds on data, model and engine set-up, so a signal sent now arrives during
    start-up (which must not kill them) and takes effect after step 1."""
    deadline = time.time() + 90
    while not (run_dir / "config.yaml").is_file():
        assert time.time() < deadline, job_log(run_dir, job_id)
        assert cluster.job(job_id)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), job_log(run_dir, job_id)
        time.sleep(0.05)


def test_usr1_mid_run_checkpoints_requeues_and_the_requeued_job_resumes(cluster, corpus, tmp_path):
    """What `--signal=USR1@S` does before the time limit, sent with scancel once training is past its first
    periodic checkpoint: the ranks finish the step they are in and checkpoint it, rank 0 requeues the job, and
    the requeued job (same id, same log) resumes from that step to the end."""
    max_steps = 80  # 40-100 steps/s here; the signal lands within a few steps
    config, run_dir = write_run(tmp_path, corpus, optim__max_steps=max_steps, checkpoint__every=10)
    job_id = submit(cluster, config, "--ntasks-per-node", "2")
    deadline = time.time() + 90
    while not (train_rows(run_dir) and max(train_rows(run_dir)) >= 10):
        assert time.time() < deadline, job_log(run_dir, job_id)
        assert cluster.job(job_id)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), job_log(run_dir, job_id)
        time.sleep(0.02)
    subprocess.run(["scancel", "--signal=USR1", job_id], env=cluster.env(), check=True)

    # Slurm holds a requeued batch job for 120 s (BeginTime) before it may start again; release it now.
    deadline = time.time() + 60
    while True:
        job = cluster.job(job_id)
        if job.get("Restarts") == "1" and job["JobState"] == "PENDING":
            break
        assert time.time() < deadline, f"{job}\n{job_log(run_dir, job_id)}"
        time.sleep(0.1)
    # Slurm's hold also lets the old job's step finish on the node; releasing the job earlier than Slurm would,
    # wait for that first, or the new batch may land on a node still completing the old one and fail at launch.
    cluster.wait_idle(60)
    cluster.scontrol("update", f"JobId={job_id}", "StartTime=now")
    job = finish(cluster, job_id, run_dir)

    log = (run_dir / "slurm" / f"{job_id}.out").read_text()
    stopped = re.search(r"stopped at step (\d+)(?:, valid ppl [\d.]+)?, checkpoint saved; requeueing", log)
    assert stopped, job_log(run_dir, job_id)
    step = int(stopped.group(1))
    assert 10 <= step < max_steps, job_log(run_dir, job_id)
    assert f"requeueing Slurm job {job_id}" in log and f"hashmoe: job {job_id} (restart 1)" in log, log
    assert f"resuming from {run_dir / 'checkpoints' / f'step_{step}'} (step {step})" in log, log
    assert f"finished at step {max_steps}" in log and f"stopped at step {step}" in log
    # the loss curve continues: every step exactly once, no gap, no duplicate
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in r]
    assert steps == list(range(1, max_steps + 1)), steps
    assert checkpoint_state(run_dir, max_steps)["world_size"] == 2


def test_scancel_checkpoints_and_stops_without_requeue(cluster, corpus, tmp_path):
    """`scancel JOB` (SIGTERM to every rank, as at the time limit) means stop: the ranks checkpoint the step
    they are in, and the job stays cancelled. Resubmitting continues from that checkpoint."""
    config, run_dir = write_run(tmp_path, corpus)
    job_id = submit(cluster, config, "--ntasks-per-node", "2")
    wait_until_ranks_started(cluster, job_id, run_dir)
    subprocess.run(["scancel", job_id], env=cluster.env(), check=True)
    deadline = time.time() + 60
    while job_id in subprocess.run(["squeue", "--noheader", "-o", "%i"], capture_output=True, text=True,
                                   env=cluster.env()).stdout.split():  # until the ranks have exited
        assert time.time() < deadline, job_log(run_dir, job_id)
        time.sleep(0.1)
    job = cluster.job(job_id)
    assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "0"), job
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    assert 1 <= step < MAX_STEPS and checkpoint_state(run_dir, step)["world_size"] == 2, job_log(run_dir, job_id)
    assert "requeueing" not in (run_dir / "slurm" / f"{job_id}.out").read_text()


def test_two_node_job_one_rank_per_emulated_node(cluster, corpus, tmp_path):
    """Ranks on n1 and n2 meet at n1's NodeAddr (the names do not resolve) on the job's derived port."""
    config, run_dir = write_run(tmp_path, corpus)
    job_id = submit(cluster, config, "--nodes", "2", "--ntasks-per-node", "1")
    job = finish(cluster, job_id, run_dir)
    assert job["NodeList"] == "n[1-2]" and job["NumNodes"] == "2", job
    log = (run_dir / "slurm" / f"{job_id}.out").read_text()
    assert f"2 ranks (srun), rendezvous 127.0.0.1:{15000 + int(job_id) % 15000}" in log, log
    assert sorted(train_rows(run_dir)) == list(range(1, MAX_STEPS + 1))
    assert checkpoint_state(run_dir, MAX_STEPS)["world_size"] == 2


def test_a_missing_store_is_prepared_by_a_cpu_job_that_training_waits_for(cluster, corpus, tmp_path):
    corpus_file, _ = corpus
    config, run_dir = write_run(tmp_path, (corpus_file, tmp_path / "fresh-cache"), optim__max_steps=4,
                                checkpoint__every=4, logging__eval_every=4)
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "slurm", str(config), "--gpus-per-node", "0",
                             "--ntasks-per-node", "2", "--cpus-per-task", "1", "--prepare-cpus", "1"], cwd=ROOT,
                            env=cluster.env(env_for_run()), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    prepare_id = re.search(r"job (\d+) \(1 CPUs\) prepares it", result.stdout).group(1)
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)
    prepared = finish(cluster, prepare_id, run_dir)
    assert prepared["NumCPUs"] == "1", prepared
    prepare_log = (run_dir / "slurm" / f"prepare-{prepare_id}.out").read_text()
    assert "hashmoe: data store prepared" in prepare_log, prepare_log
    finish(cluster, job_id, run_dir)
    assert sorted(train_rows(run_dir)) == [1, 2, 3, 4]
    store = next((tmp_path / "fresh-cache").glob("*/manifest.json")).parent
    assert checkpoint_state(run_dir, 4)["data_fingerprint"] == store.name


def test_a_second_submission_into_the_folder_waits_for_the_first_instead_of_racing_it(cluster, corpus, tmp_path):
    config, run_dir = write_run(tmp_path, corpus)
    first = submit(cluster, config, "--ntasks-per-node", "2")
    second = submit(cluster, config, "--ntasks-per-node", "2")
    cluster.wait_for_state(first, {"RUNNING", "COMPLETED"}, 60)
    waiting = cluster.job(second)
    if cluster.job(first).get("JobState") == "RUNNING":  # (the first may already be done on a fast machine)
        assert waiting["JobState"] == "PENDING" and waiting["Reason"] == "Dependency", waiting
    finish(cluster, first, run_dir)
    finish(cluster, second, run_dir)
    assert "already finished at step" in (run_dir / "slurm" / f"{second}.out").read_text()
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == list(range(1, MAX_STEPS + 1))  # each step once: the two jobs never wrote at once
