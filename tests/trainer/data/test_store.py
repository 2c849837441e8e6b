"""Tests for trainer/data/store.py with real processes: one builder at a time (the other waits), a dead
builder's staging folder taken over, waiting that ends in "complete", "failed", "stopped" or "absent", and an
interrupted build that leaves nothing looking complete."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from trainer.data.store import HEARTBEAT, MANIFEST, StorePaths, build_once, failure_message, wait_for_store
from trainer.fileio import this_process


def slow_build(staging: Path, progress: dict) -> None:
    """A build that takes a while and leaves a trace of who ran it."""
    with open(staging.parent.parent / "builders.log", "a") as log:  # staging: LOCK/build-ID
        log.write(f"{staging.name}\n")
    progress["stage"] = "slow"
    time.sleep(1.5)
    (staging / MANIFEST).write_text("{}")


def build_in_process(target: str, result: str) -> None:
    built = build_once(StorePaths(Path(target)), slow_build, timeout_s=30)
    Path(result).write_text(json.dumps(built))


@pytest.mark.slow
def test_two_preparations_at_once_build_once(tmp_path):
    target = tmp_path / "cache" / "abc"
    spawn = multiprocessing.get_context("spawn")
    processes = [spawn.Process(target=build_in_process, args=(str(target), str(tmp_path / f"r{i}")))
                 for i in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(json.loads((tmp_path / f"r{i}").read_text()) for i in range(2)) == [False, True]
    assert (tmp_path / "cache" / "builders.log").read_text().count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["abc", "builders.log"]
    assert not (target / HEARTBEAT).exists()  # the heartbeat is not part of the store


def dead_pid() -> int:
    process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    process.start()
    process.join()
    return process.pid


def test_a_dead_builders_staging_folder_is_taken_over(tmp_path):
    paths = StorePaths(tmp_path / "abc")
    paths.staging.mkdir()
    (paths.staging / "train.bin").write_bytes(b"half")
    (paths.staging / HEARTBEAT).write_text(json.dumps({**this_process(), "pid": dead_pid(), "process_start": ""}))
    started = time.monotonic()
    assert build_once(paths, lambda staging, progress: (staging / MANIFEST).write_text("{}"), timeout_s=60)
    assert time.monotonic() - started < 10  # a dead process on this host needs no timeout
    assert [p.name for p in tmp_path.iterdir()] == ["abc"] and not (paths.target / "train.bin").exists()


def test_waiting_ends_complete_failed_stopped_or_absent(tmp_path):
    paths = StorePaths(tmp_path / "abc")
    assert wait_for_store(paths, 0.5, None, "test") == "absent"

    threading.Timer(0.3, lambda: paths.record_failure("data.train_files: bad shard. Fix it")).start()
    assert wait_for_store(paths, 30, None, "test") == "failed: data.train_files: bad shard. Fix it"
    assert wait_for_store(paths, 0.5, paths.failure(), "test") == "absent"  # an old failure is not this build's

    paths.staging.mkdir()  # a builder on another host whose heartbeat stopped changing
    (paths.staging / HEARTBEAT).write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": 0}))
    assert wait_for_store(paths, 0.5, paths.failure(), "test") == "stopped"

    def finish():
        paths.target.mkdir()
        (paths.target / MANIFEST).write_text("{}")

    threading.Timer(0.3, finish).start()
    assert wait_for_store(paths, 30, paths.failure(), "test") == "complete"


def test_an_interrupted_build_leaves_nothing_that_looks_complete(tmp_path):
    paths = StorePaths(tmp_path / "abc")

    def interrupted(staging, progress):
        (staging / "train.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once(paths, interrupted, timeout_s=5)
    assert not paths.target.exists() and not paths.staging.exists()
    assert failure_message(paths.failure()) == "interrupted (Ctrl-C)"
    assert build_once(paths, lambda staging, progress: (staging / MANIFEST).write_text("{}"), timeout_s=5)
    assert paths.complete() and paths.failure() is None


def test_a_build_taken_over_midway_never_renames_its_half_store(tmp_path):
    paths = StorePaths(tmp_path / "abc")

    def taken_over(build_dir: Path, progress: dict) -> None:
        (build_dir / MANIFEST).write_text("{}")  # looks complete, but another process took the lock meanwhile:
        os.rename(paths.staging, tmp_path / "abandoned")  # what build_once does to a builder it judged gone
        paths.staging.mkdir()
        (paths.staging / HEARTBEAT).write_text(json.dumps({"host": "elsewhere", "pid": 1, "build": "build-new"}))

    with pytest.raises(FileNotFoundError):
        build_once(paths, taken_over, timeout_s=5)
    assert not paths.target.exists() and paths.failure() is None  # nothing renamed into place, no false news
    assert json.loads((paths.staging / HEARTBEAT).read_text())["build"] == "build-new"  # the new lock untouched


def test_a_target_folder_without_manifest_is_put_aside_before_building(tmp_path):
    paths = StorePaths(tmp_path / "abc")
    paths.target.mkdir()
    (paths.target / "train.bin").write_bytes(b"left by an interrupted delete")
    assert build_once(paths, lambda build_dir, progress: (build_dir / MANIFEST).write_text("{}"), timeout_s=5)
    assert sorted(p.name for p in paths.target.iterdir()) == [MANIFEST] and [p.name for p in tmp_path.iterdir()] == ["abc"]
