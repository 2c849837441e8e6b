"""`hashmoe launch`: N local ranks of `hashmoe train` on this machine, loopback rendezvous.

The ranks run in their own session, so a Ctrl-C in the terminal reaches only this launcher, which passes each
SIGINT / SIGTERM / SIGUSR1 on to every rank exactly once: the first Ctrl-C makes all ranks finish the step and
checkpoint together, a second one makes them exit at once. When a rank fails, the others are stopped (a peer
of a dead rank would wait in its next collective forever) and one line says which rank and how; the rank's own
message (a configuration error, a traceback) is above it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from trainer.distributed import free_port
from trainer.errors import EXIT_USER_ERROR

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
GRACE_SECONDS = 10.0  # after one rank failed: time for the others to fail on their own before being killed
EXIT_INTERRUPTED = 130


def launch_local(nproc: int, train_args: list[str]) -> int:
    port = free_port()
    ranks = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"), "HASHMOE_LAUNCHER": "hashmoe launch"}
        ranks.append(subprocess.Popen([sys.executable, "-m", "trainer.cli", "train", *train_args], env=env,
                                      start_new_session=True))

    def forward(signum, frame):
        for process in ranks:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        return _wait(ranks)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(ranks: list[subprocess.Popen]) -> int:
    failed_at = None
    first_failure = None
    while any(p.poll() is None for p in ranks):
        if first_failure is None:
            for rank, process in enumerate(ranks):
                code = process.poll()
                if code not in (None, 0, EXIT_INTERRUPTED):
                    first_failure, failed_at = (rank, code), time.monotonic()
                    break
        if failed_at is not None and time.monotonic() - failed_at > GRACE_SECONDS:
            for process in ranks:
                if process.poll() is None:
                    process.kill()
        time.sleep(0.1)
    codes = [p.returncode for p in ranks]
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
        others = [r for r, c in enumerate(codes) if r != rank and c not in (0, EXIT_INTERRUPTED, EXIT_USER_ERROR)]
        print(f"hashmoe launch: rank {rank} {how} (its output is above)"
              + (f"; stopped ranks {', '.join(map(str, others))}" if others else ""), file=sys.stderr, flush=True)
    return code if code > 0 else 1
