"""The benchmarks' "other load" monitor sees a concurrent process: a busy loop on another core is measured as
about one core elsewhere, and QuietRounds drops (or, in a smoke run, counts) the rounds it disturbed."""

import subprocess
import sys
import time

import pytest

from benchmarks.common import OtherLoad, QuietRounds


@pytest.fixture
def busy_loop():
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # running
    yield process
    process.kill()
    process.wait()


def small_round():
    """A few ms of our own work, as a timed call of the layer suite is."""
    end = time.perf_counter() + 0.004
    while time.perf_counter() < end:
        pass
    return 0.004


def test_the_monitor_measures_a_busy_loop_as_about_one_core(busy_loop):
    monitor = OtherLoad()
    time.sleep(0.5)
    assert monitor.cores() > 0.6


def test_rounds_disturbed_by_a_busy_loop_are_dropped_then_counted(busy_loop):
    rounds = QuietRounds(quick=False, pause_s=0.05, max_pause_s=0.1)
    assert len(rounds.run(small_round, 100)) == 100
    assert rounds.dropped > 0 and rounds.kept_loaded > 0 and rounds.worst > 0.5
    assert "dropped" in rounds.note() and "not to be trusted" in rounds.note()


def test_a_smoke_run_keeps_disturbed_rounds_but_says_so(busy_loop):
    rounds = QuietRounds(quick=True)
    rounds.run(small_round, 100)
    assert rounds.dropped == 0 and rounds.kept_loaded > 0
    assert "a smoke run does not repeat" in rounds.note()
