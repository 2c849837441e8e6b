"""Small files of a run folder (config.yaml, metrics.jsonl after a restart, a checkpoint's manifest and
`latest`) are written aside and renamed into place: a crash leaves the old file or the new one, never half.

And who wrote a file: the identity a lock or a heartbeat records (host, pid, when the process started), and
whether that process still lives, which can be told only on the same host, in the same pid namespace, since the
same boot (a container on the same host, or a host rebooted since, reuses pids)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def process_stat(pid: int) -> list[str]:
    """Fields 3 onwards of /proc/PID/stat (state, ppid, ..., start time at index 19), [] for no such process.
    Split after the last ")": the command name in between may hold spaces and parentheses."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rpartition(")")[2].split() if ")" in stat else []


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks after boot (field 22 of /proc/PID/stat), "" where unknown."""
    fields = process_stat(pid)
    return fields[19] if len(fields) > 19 else ""


def _pid_namespace() -> str:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/ns/pid")
    return ""


def this_process() -> dict:
    """The identity of this process, as a lock or heartbeat file records it."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid),
            "boot_id": _read("/proc/sys/kernel/random/boot_id"), "pid_namespace": _pid_namespace()}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def process_state(identity: dict) -> str:
    """"alive" or "dead" for a process recorded by this_process() on this host (same boot, same pid namespace),
    "elsewhere" when this host cannot tell (another host or container: judge it by its heartbeat instead)."""
    me = this_process()
    if any(identity.get(key) != me[key] for key in ("host", "boot_id", "pid_namespace")):
        return "elsewhere"
    pid = identity.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return "dead"
    started = identity.get("process_start")
    # the pid lives, but was it reused by a process started later?
    return "dead" if started and _process_start(pid) not in ("", started) else "alive"
