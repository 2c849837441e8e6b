"""A rank that stops answering: found by the collective timeout, named, and survived by a rerun.

Every process group gets `parallel.collective_timeout_s` (trainer.parallel.distributed). When a collective fails on a
rank (its peer did not answer within the timeout, or the peer's connection closed because it died), that rank
reports to the rendezvous store (`hashmoe/fault/RANK`: the step and what it was doing) and exits with
EXIT_PEER_LOST without writing anything more. Who is named: the ranks that did not report. Under `hashmoe
launch` the launcher hosts the store, so it reads the reports even when rank 0 is the one that stopped, ends
every rank and prints the one line; under srun, torchrun or mpirun the lowest reporting rank prints it after
REPORT_WAIT_S (the store lives in rank 0 there, or in torchrun's agent: if it does not answer, rank 0 is the
one named), and the launcher's own rule (srun --kill-on-bad-exit, torchrun, mpirun) ends the rest.

While no optimizer step finishes, rank 0 says so every STALL_REPORT_S seconds, with what it is doing, so a log
shows a hang while it happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from trainer.parallel.distributed import STORE_ENV

EXIT_PEER_LOST = 3
REPORT_WAIT_S = 10.0  # how long the ranks that saw a fault wait for each other's reports
STORE_TIMEOUT_S = 5.0  # a store that does not answer in this time is taken for gone (with rank 0)
# What the collective layer says when a peer is gone (matched ignoring case): gloo's transport (a recv that timed
# out, or a pair closed by the timeout while a collective waited: both seen with a SIGSTOPped peer), NCCL's
# watchdog, the store's socket.
PEER_FAILURE_MARKERS = ("timed out waiting", "application timeout caused pair closure", "connection closed by peer",
                        "connection reset by peer", "socket closed", "broken pipe",
                        "watchdog caught collective operation timeout", "socket timeout")


def stall_report_s(collective_timeout_s: float) -> float:
    """Half the timeout, at most a minute: the line comes before the timeout ends the job."""
    return min(60.0, collective_timeout_s / 2)


class RunProgress:
    """What the rank is doing (read by the stall reporter's thread and the fault report)."""

    def __init__(self):
        self.step = 0  # optimizer steps finished
        self.doing = "while setting up"
        self.last_step_at = time.monotonic()

    def set(self, doing: str) -> None:
        self.doing = doing

    def step_finished(self, step: int) -> None:
        self.step, self.last_step_at = step, time.monotonic()
        self.doing = f"after step {step}"


class StallReporter:
    """Rank 0: a line every `every_s` seconds while no optimizer step finishes."""

    def __init__(self, progress: RunProgress, every_s: float):
        self.progress, self.every_s = progress, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hashmoe-stall-report", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        reported_for = None
        while not self._stop.wait(min(1.0, self.every_s / 4)):
            quiet = time.monotonic() - self.progress.last_step_at
            marker = self.progress.last_step_at
            periods = int(quiet // self.every_s)
            if periods >= 1 and reported_for != (marker, periods):
                reported_for = (marker, periods)
                print(f"hashmoe: no optimizer step finished for {quiet:.0f} s ({self.progress.doing})",
                      file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def is_peer_failure(err: BaseException) -> bool:
    """A collective that failed because another rank did not answer or died (not a bug on this rank)."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistNetworkError", ())):
        return True
    return isinstance(err, RuntimeError) and any(marker in str(err).lower() for marker in PEER_FAILURE_MARKERS)


def how_it_failed(err: BaseException, timeout_s: float) -> str:
    text = str(err).lower()
    if "timeout" not in text and any(word in text for word in ("closed", "reset", "broken pipe")):
        return "its connection closed: the process ended"
    return f"no reply within parallel.collective_timeout_s={timeout_s:g} s"


def fault_key(name: str) -> str:
    """A key of this run attempt (torchrun's agent keeps its store over restarts)."""
    return f"hashmoe/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


def _store():
    """A new connection to the rendezvous store (MASTER_ADDR:MASTER_PORT): the process group's own may be
    wrapped in prefixes, and the launcher reads the keys as they are."""
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=STORE_TIMEOUT_S))


def read_reports(store, world_size: int) -> dict[int, dict]:
    reports = {}
    for rank in range(world_size):
        if store.check([fault_key(f"fault/{rank}")]):
            reports[rank] = json.loads(store.get(fault_key(f"fault/{rank}")))
    return reports


def fault_line(silent: list[int], how: str, report: dict, run_dir: Path, prefix: str = "hashmoe",
               ended: str = "the other ranks exit") -> str:
    """The one line: who stopped answering, in which step, and where a rerun resumes."""
    from trainer.run.checkpoint import latest_checkpoint

    who = f"rank {silent[0]}" if len(silent) == 1 else f"ranks {', '.join(map(str, silent))}"
    if not silent:
        who = "a rank"
    latest = latest_checkpoint(run_dir)
    resume = (f"last intact checkpoint {latest} (step {latest.name.removeprefix('step_')}): run the same command "
              "to resume from it") if latest else "no checkpoint was saved yet: run the same command to start again"
    return (f"{prefix}: {who} stopped answering {report.get('doing', 'during the run')} ({how}); {ended} "
            f"(exit status {EXIT_PEER_LOST}); {resume}")


def exit_lost_peer(err: BaseException, rank: int, world_size: int, progress: RunProgress, run_dir: Path,
                   timeout_s: float) -> None:
    """On a rank whose collective failed because of a peer: report, name the silent ranks (the lowest reporter,
    when no launcher of ours does), and end this process at once: no write, no teardown (tearing down a group
    whose peer is stopped can block)."""
    how = how_it_failed(err, timeout_s)
    report = {"step": progress.step, "doing": progress.doing, "how": how}
    under_launcher = os.environ.get(STORE_ENV) == "launcher"
    outcome = {}
    # in a thread: a store whose host is stopped accepts the connection and never answers, and not every store
    # call honours its timeout
    talk = threading.Thread(target=_report, args=(rank, world_size, report, under_launcher, outcome), daemon=True)
    talk.start()
    talk.join(STORE_TIMEOUT_S + REPORT_WAIT_S + 5)
    line = None
    if "silent" in outcome:
        line = fault_line(outcome["silent"], how, report, run_dir) if outcome.get("print") else None
    elif not under_launcher and rank == 1:  # the store is gone: so is its host, rank 0 (or torchrun's agent)
        line = fault_line([0], f"{how}; the rendezvous store it hosts does not answer either", report, run_dir)
    if line:
        print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_PEER_LOST)


def _report(rank: int, world_size: int, report: dict, under_launcher: bool, outcome: dict) -> None:
    try:
        store = _store()
        store.set(fault_key(f"fault/{rank}"), json.dumps(report))
        store.add(fault_key("faults"), 1)
        if under_launcher:  # the launcher names the silent ranks
            outcome["silent"] = []
            return
        deadline = time.monotonic() + REPORT_WAIT_S
        while store.add(fault_key("faults"), 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.2)
        reports = read_reports(store, world_size)
        crashed = any(store.check([fault_key(f"crashed/{r}")]) for r in range(world_size) if r not in reports)
        # one printer, the first to get here; none when a silent rank crashed (its traceback says why)
        outcome["print"] = not crashed and store.compare_set(fault_key("printer"), "", str(rank)) == str(rank).encode()
        outcome["silent"] = [r for r in range(world_size) if r not in reports]
        store.add(fault_key("faults_read"), 1)
        if rank == 0:  # rank 0 hosts the store: the others read their reports from it first
            deadline = time.monotonic() + STORE_TIMEOUT_S
            while store.add(fault_key("faults_read"), 0) < len(reports) and time.monotonic() < deadline:
                time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store does not answer: outcome stays empty
        outcome.clear()


def report_crash(rank: int) -> None:
    """A rank that fails on its own (a bug, a local error) says so before its traceback ends it: the others then
    do not name it as a rank that stopped answering. Best effort, a few seconds at most."""
    def mark():
        with contextlib.suppress(Exception):
            _store().set(fault_key(f"crashed/{rank}"), "1")

    thread = threading.Thread(target=mark, daemon=True)
    thread.start()
    thread.join(STORE_TIMEOUT_S)
