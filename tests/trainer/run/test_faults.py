"""Faults a cluster produces, with real processes: two runs into one folder, a killed holder, a paused holder
that lost its folder, a rank stopped (SIGSTOP) or killed (SIGKILL) mid-run under `hashmoe launch` and under
torchrun, and a launcher killed with its ranks running. Each ends with the documented line and exit status,
leaves the run folder intact, and the same command resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainer.harness import (
    ROOT,
    base_config,
    check,
    env_for_run,
    run,
    torchrun,
    train_command,
    wait_for_step,
    write_config,
    write_corpus,
)
from trainer.fileio import process_stat
from trainer.run.checkpoint import damage, latest_checkpoint
from trainer.run.faults import EXIT_PEER_LOST
from trainer.run.run_lock import LOCK_FILE, read_holder

pytestmark = pytest.mark.slow

TIMEOUT_S = 5  # parallel.collective_timeout_s of the multi-rank cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return write_corpus(root), root / "cache"


def config_file(tmp_path: Path, corpus, max_steps: int, **overrides) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    settings = dict(optim__max_steps=max_steps, logging__eval_every=10, checkpoint__every=4,
                    parallel__collective_timeout_s=TIMEOUT_S)
    config = base_config(run_dir, *corpus, **{**settings, **overrides})
    return run_dir, write_config(tmp_path / "run.yaml", config)


def launch_command(config: Path, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "launch", str(config), "--nproc", str(nproc)]


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=env_for_run(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def metric_steps(run_dir: Path) -> list[int]:
    """The step of every training row of metrics.jsonl, as written (a step written twice shows twice)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["step"] for row in rows if "train/loss" in row]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (the ranks of a launcher, and theirs)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = process_stat(int(stat.parent.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pid(parent: int, rank: int) -> int:
    for pid in descendants(parent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"-m\0trainer.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError(f"no rank {rank} under {parent}")


def alive(pid: int) -> bool:
    fields = process_stat(pid)
    return bool(fields) and fields[0] != "Z"


def test_a_second_run_into_a_folder_in_use_exits_2_and_the_first_finishes(corpus, tmp_path):
    run_dir, config = config_file(tmp_path, corpus, max_steps=200)
    first = start(train_command(config, 1))
    wait_for_step(run_dir, 1, first)
    holder, _ = read_holder(run_dir / LOCK_FILE)
    started = time.monotonic()
    second = run(train_command(config, 1))
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("hashmoe: error")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert errors[0].startswith(f"hashmoe: error: run.output_dir: {run_dir} is in use by hashmoe train on host "
                                f"{holder['host']} pid {first.pid}, since {holder['since']}"), errors[0]
    assert "--output DIR" in errors[0]
    print(f"{errors[0]}  ({time.monotonic() - started:.1f} s)")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert metric_steps(run_dir) == list(range(1, 201))  # each step once: the second run wrote nothing
    assert not (run_dir / LOCK_FILE).exists()


def test_a_killed_launcher_takes_its_ranks_along_and_its_folder_is_taken_over(corpus, tmp_path):
    run_dir, config = config_file(tmp_path, corpus, max_steps=24, parallel__ep_size=2)
    launcher = start(launch_command(config))
    wait_for_step(run_dir, 5, launcher)
    ranks = [rank_pid(launcher.pid, r) for r in (0, 1)]
    launcher.kill()
    launcher.communicate()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in ranks)  # no rank is left writing into the folder
    assert read_holder(run_dir / LOCK_FILE)[0]["pid"] == launcher.pid  # kill -9 left the lock

    resumed = check(run(launch_command(config)))
    assert f"took over the run folder {run_dir} from hashmoe launch on host" in resumed.stderr
    assert f"pid {launcher.pid}" in resumed.stderr and "is gone from this host" in resumed.stderr
    assert "resuming from" in resumed.stdout and "finished at step 24" in resumed.stdout
    assert not (run_dir / LOCK_FILE).exists()


def test_a_paused_holder_that_lost_its_folder_exits_without_writing(corpus, tmp_path):
    run_dir, config = config_file(tmp_path, corpus, max_steps=400, checkpoint__every=0)
    holder = start(train_command(config, 1))
    wait_for_step(run_dir, 2, holder)
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        # a run on another node found no heartbeat for minutes and took the folder: the lock is its now
        os.rename(run_dir / LOCK_FILE, run_dir / "old.lock")
        taker = {**json.loads((run_dir / "old.lock").read_text()), "host": "node-b", "pid": 777, "token": "b" * 32}
        (run_dir / LOCK_FILE).write_text(json.dumps(taker))
        (run_dir / "old.lock").unlink()
        lock, steps = (run_dir / LOCK_FILE).read_text(), metric_steps(run_dir)
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    out, err = holder.communicate(timeout=120)
    assert holder.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("hashmoe: error")]
    assert len(errors) == 1 and "is no longer this run's: it was taken over by hashmoe train on host node-b " \
        "pid 777" in errors[0], err[-3000:]
    print(errors[0])
    # Nothing more than the row of the step it was paused in (the documented window: the lock is read before
    # each write, not during one); no checkpoint; the new holder's lock kept.
    assert metric_steps(run_dir)[:len(steps)] == steps and len(metric_steps(run_dir)) <= len(steps) + 1
    assert not (run_dir / "checkpoints").exists() and (run_dir / LOCK_FILE).read_text() == lock


@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_rank_that_stops_answering_ends_the_launch_with_one_line_and_a_rerun_resumes(fault, corpus, tmp_path):
    run_dir, config = config_file(tmp_path, corpus, max_steps=36, parallel__ep_size=2)
    launcher = start(launch_command(config))
    wait_for_step(run_dir, 6, launcher)  # past the checkpoint of step 4
    ranks = [rank_pid(launcher.pid, r) for r in (0, 1)]
    os.kill(ranks[1], getattr(signal, fault))
    faulted = time.monotonic()
    out, err = launcher.communicate(timeout=TIMEOUT_S + 60)
    seconds = time.monotonic() - faulted
    assert launcher.returncode == EXIT_PEER_LOST, err[-3000:]
    assert seconds < TIMEOUT_S + 30
    lines = [line for line in err.splitlines() if line.startswith("hashmoe launch:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    how = "it was stopped: SIGSTOP" if fault == "SIGSTOP" else "it was killed by SIGKILL"
    assert lines[0].startswith("hashmoe launch: rank 1 stopped answering ") and how in lines[0], lines[0]
    latest = latest_checkpoint(run_dir)
    assert f"last intact checkpoint {latest} (step " in lines[0] and "run the same command" in lines[0]
    print(f"{lines[0]}  ({seconds:.1f} s after {fault})")
    assert not any(alive(pid) for pid in ranks)  # the stopped rank too
    assert damage(latest) is None and not (run_dir / LOCK_FILE).exists()
    if fault == "SIGSTOP":  # while the job hung, rank 0 said so
        assert "hashmoe: no optimizer step finished for " in err, err[-3000:]

    resumed = check(run(launch_command(config)))
    assert f"resuming from {latest}" in resumed.stdout and "finished at step 36" in resumed.stdout
    steps = metric_steps(run_dir)
    assert sorted(set(steps)) == list(range(1, 37))


def test_under_torchrun_the_lowest_surviving_rank_names_the_stopped_one(corpus, tmp_path):
    run_dir, config = config_file(tmp_path, corpus, max_steps=400, parallel__ep_size=2)
    agent = start(torchrun(2, ["-m", "trainer.cli", "train", str(config)]))
    wait_for_step(run_dir, 6, agent)
    stopped = rank_pid(agent.pid, 1)
    os.kill(stopped, signal.SIGSTOP)
    faulted = time.monotonic()
    try:
        out, err = agent.communicate(timeout=TIMEOUT_S + 90)
    finally:
        if alive(stopped):
            os.kill(stopped, signal.SIGKILL)
    seconds = time.monotonic() - faulted
    lines = [line for line in err.splitlines() if "stopped answering" in line]
    assert len(lines) == 1 and lines[0].startswith("hashmoe: rank 1 stopped answering "), err[-3000:]
    assert f"no reply within parallel.collective_timeout_s={TIMEOUT_S} s" in lines[0]
    assert f"last intact checkpoint {latest_checkpoint(run_dir)}" in lines[0]
    assert agent.returncode != 0
    print(f"{lines[0]}  ({seconds:.1f} s after SIGSTOP; torchrun exit {agent.returncode})")


def test_a_rank_that_fails_on_its_own_is_reported_as_a_failure_not_a_hang(corpus, tmp_path):
    """A bug on rank 1 (planted through sitecustomize: train_step raises at step 6): its peer loses it too, but
    the launcher names the failure and its exit status, not "stopped answering ... run the same command"."""
    run_dir, config = config_file(tmp_path, corpus, max_steps=36, parallel__ep_size=2)
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1' and os.environ.get('HASHMOE_LAUNCHER'):\n"
        "    import trainer.run.steps\n"
        "    step = trainer.run.steps.TrainLoop.train_step\n"
        "    def fail(self, at):\n"
        "        if at == 5:\n"
        "            raise ValueError('a bug on rank 1')\n"
        "        return step(self, at)\n"
        "    trainer.run.steps.TrainLoop.train_step = fail\n")
    env = {**env_for_run(), "PYTHONPATH": f"{plant}{os.pathsep}{ROOT}"}
    result = subprocess.run(launch_command(config), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "ValueError: a bug on rank 1" in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("hashmoe launch:")]
    assert lines == ["hashmoe launch: rank 1 exited with code 1 (its output is above)"], result.stderr[-3000:]
    assert "stopped answering" not in result.stderr
