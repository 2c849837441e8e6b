"""The run folder's lock as another host, another run or a requeued Slurm job leaves it: the lock file is the
protocol between runs, so a hand-written one is what a run on another node writes (host, pid, token, mtime)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from trainer.errors import UserError
from trainer.fileio import this_process
from trainer.run.run_lock import LOCK_FILE, REQUEUE_STALE_S, STALE_S, RunFolderLock, read_holder


def foreign_lock(run_dir, age_s: float = 0.0, **fields) -> dict:
    """The lock a run on node-b holds (or held), its last heartbeat age_s seconds ago."""
    holder = {"host": "node-b", "pid": 4242, "process_start": "1", "boot_id": "other", "pid_namespace": "pid:[1]",
              "command": "hashmoe train", "token": "b" * 32, "since": "2026-12-06 09:00:00 UTC",
              "slurm_job_id": None, "slurm_restart_count": None, **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps(holder))
    os.utime(path, (time.time() - age_s,) * 2)
    return holder


def test_a_second_lock_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    first = RunFolderLock.acquire(tmp_path / "run")
    try:
        with pytest.raises(UserError) as refused:
            RunFolderLock.acquire(tmp_path / "run")
        me = this_process()
        assert refused.value.key == "run.output_dir"
        assert f"in use by hashmoe train on host {me['host']} pid {me['pid']}" in refused.value.problem
        assert "--output DIR" in refused.value.fix
        assert first.lost() is None  # the holder is untouched
    finally:
        first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no claim files left behind


@pytest.mark.parametrize("before", ["free", "stale"])
def test_of_runs_started_at_once_exactly_one_gets_the_folder(before, tmp_path):
    if before == "stale":  # all of them judge the same gone holder: one takes it over, the others see its lock
        foreign_lock(tmp_path / "run", age_s=STALE_S + 60)
    outcomes, barrier = [], threading.Barrier(8)

    def contend():
        barrier.wait()
        try:
            outcomes.append(RunFolderLock.acquire(tmp_path / "run"))
        except UserError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = [o for o in outcomes if isinstance(o, RunFolderLock)]
    assert len(held) == 1 and len(outcomes) == 8
    held[0].release()


def test_a_fresh_lock_from_another_host_is_refused_and_a_stale_one_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    foreign_lock(run_dir, age_s=5)
    with pytest.raises(UserError) as refused:
        RunFolderLock.acquire(run_dir)
    assert "host node-b pid 4242" in refused.value.problem and "heartbeat 5 s ago" in refused.value.problem

    foreign_lock(run_dir, age_s=STALE_S + 60)
    lock = RunFolderLock.acquire(run_dir)
    warning = capsys.readouterr().err
    assert "took over the run folder" in warning and "node-b pid 4242" in warning and "no heartbeat for 18" in warning
    assert read_holder(run_dir / LOCK_FILE)[0]["token"] == lock.token
    lock.release()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path, capsys):
    run_dir = tmp_path / "run"
    me = this_process()
    foreign_lock(run_dir, **{**me, "pid": 2**22 + 17, "process_start": "5"})  # no such process
    lock = RunFolderLock.acquire(run_dir)
    assert f"its process {2**22 + 17} is gone from this host" in capsys.readouterr().err
    lock.release()


def test_a_requeued_slurm_job_takes_its_own_lock_back(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # the job's first run, on another node, went silent a little under REQUEUE_STALE_S ago: waited for, taken
    foreign_lock(run_dir, age_s=REQUEUE_STALE_S - 3, slurm_job_id="812", slurm_restart_count=None)
    environ = {"SLURM_JOB_ID": "812", "SLURM_RESTART_COUNT": "1"}
    started = time.monotonic()
    lock = RunFolderLock.acquire(run_dir, environ=environ)
    assert 2 < time.monotonic() - started < 10
    assert "this Slurm job before its requeue (restart 0), silent for" in capsys.readouterr().err
    lock.release()

    foreign_lock(run_dir, slurm_job_id="812", slurm_restart_count="1")  # another step of the same allocation
    with pytest.raises(UserError, match="Slurm job 812"):
        RunFolderLock.acquire(run_dir, environ=environ)


def test_a_holder_notices_a_takeover_and_never_removes_the_new_lock(tmp_path):
    run_dir = tmp_path / "run"
    lock = RunFolderLock.acquire(run_dir)
    os.rename(run_dir / LOCK_FILE, run_dir / "aside")  # what a takeover from another host does
    new = foreign_lock(run_dir)
    assert "taken over by hashmoe train on host node-b pid 4242" in lock.lost()
    lock.release()
    assert read_holder(run_dir / LOCK_FILE)[0]["token"] == new["token"]


def test_an_unwritable_folder_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write the run folder") as refused:
        RunFolderLock.acquire(tmp_path / "file" / "run")
    assert refused.value.key == "run.output_dir"
