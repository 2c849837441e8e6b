"""`hashmoe launch`: N local ranks of `hashmoe train` on this machine, loopback rendezvous.

The launcher takes the run folder (trainer.run.run_lock) before any rank starts and holds it while they live; it
hosts the rendezvous store, so it can hear the ranks' fault reports even when rank 0 is the one that stopped.
The ranks run in their own session, so a Ctrl-C in the terminal reaches only this launcher, which passes each
SIGINT / SIGTERM / SIGUSR1 on to every rank exactly once: the first Ctrl-C makes all ranks finish the step and
checkpoint together, a second one makes them exit at once. Each rank dies with the launcher (the kernel's
parent-death signal): a launcher killed with kill -9 leaves no rank writing into the folder.

When a rank fails, the others are stopped (a peer of a dead rank would wait in its next collective until the
timeout) and one line says which rank and how; the rank's own message (a configuration error, a traceback) is
above it. When a rank stops answering (stopped, killed, hung), the others' collectives fail within
`parallel.collective_timeout_s` and they report to the store (trainer.run.faults); the launcher ends every rank,
the silent one too, and prints one line naming it, the step and the checkpoint a rerun resumes from.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from trainer.errors import EXIT_USER_ERROR
from trainer.fileio import process_stat
from trainer.parallel.distributed import STORE_ENV
from trainer.run.faults import EXIT_PEER_LOST, REPORT_WAIT_S, fault_line, read_reports

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
GRACE_SECONDS = 10.0  # after one rank failed: time for the others to fail on their own before being killed
EXIT_INTERRUPTED = 130
LAUNCHER_PID_ENV = "HASHMOE_LAUNCHER_PID"


def launch_local(nproc: int, train_args: list[str], run_dir: Path) -> int:
    import datetime

    import torch.distributed as dist

    from trainer.run.run_lock import TOKEN_ENV, RunFolderLock

    lock = RunFolderLock.acquire(run_dir, command="hashmoe launch")
    try:
        store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=30),
                              wait_for_workers=False)
        ranks = []
        for rank in range(nproc):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                   "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                   "HASHMOE_LAUNCHER": "hashmoe launch", STORE_ENV: "launcher", TOKEN_ENV: lock.token,
                   LAUNCHER_PID_ENV: str(os.getpid())}
            ranks.append(subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", *train_args], env=env,
                                          start_new_session=True))

        def forward(signum, frame):
            for process in ranks:
                if process.poll() is None:
                    process.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
        try:
            return _wait(ranks, store, run_dir)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for process in ranks:  # none outlives the launcher
                if process.poll() is None:
                    process.kill()
                    process.wait()
    finally:
        lock.release()


def follow_launcher() -> None:
    """In a rank of `hashmoe launch`: die with the launcher (Linux's parent-death signal), so a launcher killed
    with kill -9 leaves no rank writing. Not inherited by this rank's own children."""
    launcher = os.environ.pop(LAUNCHER_PID_ENV, None)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(launcher):  # the launcher died before the line above
        os._exit(1)


def _state(process: subprocess.Popen) -> str:
    """The state letter of a live process (R running, S sleeping, T stopped, ...)."""
    fields = process_stat(process.pid)
    return fields[0] if fields else "?"


def _wait(ranks: list[subprocess.Popen], store, run_dir: Path) -> int:
    failed_at = None
    first_failure = None
    fault_at = None  # when the first rank exited because a peer stopped answering
    silent_how = {}  # rank -> how it went silent, decided when the fault is settled
    while any(p.poll() is None for p in ranks):
        now = time.monotonic()
        codes = [p.poll() for p in ranks]
        if fault_at is None and EXIT_PEER_LOST in codes:
            fault_at = now
        if fault_at is not None and not silent_how:
            reports = read_reports(store, len(ranks))
            # a rank neither exited nor reported may still be timing out itself: wait for it, unless stopped
            pending = [r for r, p in enumerate(ranks) if codes[r] is None and r not in reports and _state(p) != "T"]
            if not pending or now - fault_at > REPORT_WAIT_S:
                silent_how = {r: _how(p) for r, p in enumerate(ranks) if r not in reports}
                for process in ranks:
                    if process.poll() is None:
                        process.kill()
        if first_failure is None and fault_at is None:
            for rank, code in enumerate(codes):
                if code not in (None, 0, EXIT_INTERRUPTED):
                    first_failure, failed_at = (rank, code), now
                    break
        if failed_at is not None and fault_at is None and now - failed_at > GRACE_SECONDS:
            for process in ranks:
                if process.poll() is None:
                    process.kill()
        time.sleep(0.1)
    codes = [p.returncode for p in ranks]
    # a rank that failed on its own (a bug, a configuration error): its peers lost it too, but its own message
    # says why, and rerunning would fail the same way
    crashed = [(r, c) for r, c in enumerate(codes) if c > 0 and c not in (EXIT_PEER_LOST, EXIT_INTERRUPTED)]
    if (fault_at is not None or EXIT_PEER_LOST in codes) and not crashed:
        reports = read_reports(store, len(ranks))
        silent_how = silent_how or {r: _how(p) for r, p in enumerate(ranks) if r not in reports}
        report = min(reports.items())[1] if reports else {}
        how = "; ".join(f"rank {r}: {how}" for r, how in silent_how.items()) if len(silent_how) > 1 else \
            next(iter(silent_how.values()), "")
        print(fault_line(sorted(silent_how), how, report, run_dir, prefix="hashmoe launch",
                         ended="every rank was ended"), file=sys.stderr,
              flush=True)
        return EXIT_PEER_LOST
    if crashed:
        first_failure = crashed[0]
    if first_failure is None:
        bad = [(r, c) for r, c in enumerate(codes) if c != 0]
        if not bad:
            return 0
        if all(c == EXIT_INTERRUPTED for _, c in bad):
            return EXIT_INTERRUPTED
        first_failure = bad[0]
    rank, code = first_failure
    if code != EXIT_USER_ERROR:  # a configuration or data error: already printed by the rank, in one line
        how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        others = [r for r, c in enumerate(codes)
                  if r != rank and c not in (0, EXIT_INTERRUPTED, EXIT_USER_ERROR, EXIT_PEER_LOST)]
        print(f"hashmoe launch: rank {rank} {how} (its output is above)"
              + (f"; stopped ranks {', '.join(map(str, others))}" if others else ""), file=sys.stderr, flush=True)
    return code if code > 0 else 1


def _how(process: subprocess.Popen) -> str:
    code = process.poll()
    if code is None:
        return "it was stopped: SIGSTOP, a debugger or a frozen container" if _state(process) == "T" else \
            "it hung: running, but in no collective"
    if code < 0:
        return f"it was killed by {signal.Signals(-code).name}"
    return f"it exited with code {code}"
