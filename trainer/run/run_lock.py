"""One writer per run folder: RUN_DIR/run.lock, taken before a run writes anything and held while it lives.

    RUN_DIR/run.lock   JSON: the holder (host, pid, Slurm job, since when, a token), its mtime the heartbeat

Taking it is `link()` of a complete file onto the name, which fails if the name exists: atomic on local file
systems and on NFS (where O_EXCL and flock were long unreliable), so of two runs started at once exactly one
gets it; a file is never seen half written. The holder touches the file every HEARTBEAT_S seconds from a thread
(`utime` with no time: the file server's clock sets the mtime). A run that finds the lock judges its holder:

- on this host (same boot, same pid namespace): alive or dead by its pid and the pid's start time, at once;
- the same Slurm job id, another restart count: its own job, requeued (Slurm ends a job before it requeues it);
- elsewhere: gone when the mtime is older than STALE_S by the file server's clock, read from a file this run
  has just written beside it, so the two hosts' clocks never meet.

A gone holder is taken over with a warning naming it: the lock is renamed aside (one contender wins the rename)
and taken anew. A holder that was paused (SIGSTOP, a suspended job, a frozen node) may wake after such a
takeover: its rank 0 reads the lock before every write and exits without writing when the token is not its own.
Between that read and the write lies a window of one step; nothing closes it short of a lease the file system
enforces, which NFS and Lustre do not offer."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

from trainer.errors import UserError
from trainer.fileio import process_state, this_process

LOCK_FILE = "run.lock"
HEARTBEAT_S = 15.0
# Above the heartbeat period plus NFS's attribute cache (acregmax, 60 s by default), so a live holder whose
# touches a reader sees late is never taken for gone.
STALE_S = 120.0
REQUEUE_STALE_S = 2 * HEARTBEAT_S + 5
TOKEN_ENV = "HASHMOE_RUN_LOCK_TOKEN"  # `hashmoe launch` holds the lock; its ranks check it with this token


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_FILE


def read_holder(path: Path) -> tuple[dict | None, float | None]:
    """(the holder's record or None if unreadable, the file's mtime) or (None, None) when there is no lock.
    Opened, then stat'ed through the descriptor: NFS revalidates attributes at open (close-to-open)."""
    try:
        with open(path) as f:
            mtime = os.fstat(f.fileno()).st_mtime
            text = f.read()
    except FileNotFoundError:
        return None, None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    return holder if isinstance(holder, dict) else None, mtime


def describe(holder: dict | None) -> str:
    if not holder:
        return "an unreadable lock"
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"{holder.get('command', 'a run')} on host {holder.get('host', '?')} pid {holder.get('pid', '?')}{job}, "
            f"since {holder.get('since', '?')}")


def same_job_requeued(holder: dict | None, me: dict) -> bool:
    return bool(holder and holder.get("slurm_job_id") and holder.get("slurm_job_id") == me.get("slurm_job_id")
                and holder.get("slurm_restart_count") != me.get("slurm_restart_count"))


def judge(holder: dict | None, age_s: float, me: dict) -> str | None:
    """Why the holder is gone (then take the lock over), or None while it may be alive."""
    state = process_state(holder) if holder else "elsewhere"
    if state == "dead":
        return f"its process {holder.get('pid')} is gone from this host"
    if state == "elsewhere" and age_s > STALE_S:
        return f"no heartbeat for {age_s:.0f} s (a holder on another host touches it every {HEARTBEAT_S:.0f} s)"
    # Slurm ends a job before requeueing it, but a node cut off from the controller may still run the old one:
    # its own job is taken back once the heartbeat has stopped for two periods
    if state == "elsewhere" and same_job_requeued(holder, me) and age_s > REQUEUE_STALE_S:
        return (f"it is this Slurm job before its requeue (restart {holder.get('slurm_restart_count') or 0}), "
                f"silent for {age_s:.0f} s")
    return None


class RunFolderLock:
    """RUN_DIR/run.lock held by this process (`acquire`), or by the launcher that started this rank (`adopt`:
    only checked, never touched)."""

    def __init__(self, run_dir: Path, token: str, owned: bool):
        self.run_dir, self.path, self.token, self.owned = Path(run_dir), lock_path(run_dir), token, owned
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, run_dir: Path, command: str = "hashmoe train", environ=os.environ) -> RunFolderLock:
        """Take the folder or raise UserError naming its holder. Creates the folder; fails early if it is not
        writable."""
        run_dir = Path(run_dir)
        token = uuid.uuid4().hex
        me = {**this_process(), "command": command, "token": token,
              "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "slurm_job_id": environ.get("SLURM_JOB_ID") or None,
              "slurm_restart_count": environ.get("SLURM_RESTART_COUNT") or None}
        path = lock_path(run_dir)
        claim = run_dir / f".{LOCK_FILE}.{token}"  # written whole, then linked onto the lock's name
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            claim.write_text(json.dumps(me, indent=1))
        except OSError as err:
            raise UserError("run.output_dir", f"cannot write the run folder {run_dir} ({err.strerror or err})",
                            "Pick a writable folder with --output DIR (or run.output_dir in the YAML)") from None
        try:
            deadline = time.monotonic() + REQUEUE_STALE_S + 5
            while time.monotonic() < deadline:  # each pass takes the lock, refuses, or removes one gone holder
                if _link(claim, path, token):
                    lock = cls(run_dir, token, owned=True)
                    lock._start_heartbeat()
                    return lock
                holder, mtime = read_holder(path)
                if mtime is None:  # released meanwhile
                    continue
                os.utime(claim)  # the file server's clock now, as the mtime of a file this run just touched
                age = claim.stat().st_mtime - mtime
                reason = judge(holder, age, me)
                if reason is None and same_job_requeued(holder, me) and process_state(holder) == "elsewhere":
                    time.sleep(1.0)  # this job's earlier run, on another node: wait for its heartbeat to stop
                    continue
                if reason is None:
                    raise UserError("run.output_dir", f"{run_dir} is in use by {describe(holder)} (its heartbeat "
                                    f"{max(age, 0):.0f} s ago)", "Train into another folder with --output DIR, or "
                                    "wait for that run to end (a holder that dies is taken over: at once from the "
                                    f"same host, after {STALE_S:.0f} s without a heartbeat from another)")
                if not _take_over(path, holder, reason, claim, me):
                    time.sleep(0.2)  # another run is taking it over: judge again what it leaves
            holder, _ = read_holder(path)
            raise UserError("run.output_dir", f"{run_dir} is in use by {describe(holder)}, which keeps its "
                            "heartbeat although it is this Slurm job's earlier run", "Make sure the job's earlier "
                            "run has ended (scancel, or the node's processes), then resubmit")
        finally:
            with contextlib.suppress(OSError):
                claim.unlink()

    @classmethod
    def adopt(cls, run_dir: Path, token: str) -> RunFolderLock:
        lock = cls(run_dir, token, owned=False)
        lost = lock.lost()
        if lost is not None:
            raise UserError("run.output_dir", f"{run_dir} is not held by this run's launcher ({lost})",
                            "Start the run again with hashmoe launch, or without it")
        return lock

    def lost(self) -> str | None:
        """None while the folder is this run's, else who has it now (read from the file, not the heartbeat's
        last look)."""
        holder, mtime = read_holder(self.path)
        if mtime is None:
            return f"{self.path} was removed"
        if holder is None or holder.get("token") != self.token:
            return f"it was taken over by {describe(holder)}"
        return None

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="hashmoe-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                lost = self.lost()
                if lost is not None:
                    time.sleep(1.0)  # a file server hiccup is not a takeover: read again
                    lost = self.lost()
                if lost is not None:  # rank 0 reads the lock itself before each write: this only says so now
                    print(f"hashmoe: warning: the run folder {self.run_dir} is no longer this run's: {lost}; this "
                          "run stops before its next write", file=sys.stderr, flush=True)
                    return
                os.utime(self.path)  # no times given: the file server stamps its own
            except OSError:  # a stale handle, an I/O error: try again at the next beat, never stop beating
                continue

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's (never another run's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.owned and self.lost() is None:
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.owned = False


def _link(claim: Path, path: Path, token: str) -> bool:
    try:
        os.link(claim, path)
        return True
    except FileExistsError:
        # NFS may answer a retried link that did happen with EEXIST: then the lock is this claim
        return (read_holder(path)[0] or {}).get("token") == token
    except OSError:
        # ... or with another error: the claim then has two names
        with contextlib.suppress(OSError):
            if claim.stat().st_nlink == 2:
                return True
        raise


def _take_over(path: Path, holder: dict | None, reason: str, claim: Path, me: dict) -> bool:
    """Remove a gone holder's lock, one contender at a time: the one that links RUN_DIR/run.lock.break judges
    the lock again and moves it aside; the others wait and judge what it leaves (a live lock, its own). False if
    another contender holds the break."""
    breaker = path.with_name(f"{LOCK_FILE}.break")
    try:
        os.link(claim, breaker)
    except FileExistsError:
        with contextlib.suppress(OSError):  # a contender that died holding it: remove after a minute
            if claim.stat().st_mtime - breaker.stat().st_mtime > 60:
                breaker.unlink()
        return False
    try:
        current, mtime = read_holder(path)
        if mtime is None or (current or {}).get("token") != (holder or {}).get("token"):
            return True  # it changed meanwhile: judge it again
        if judge(current, claim.stat().st_mtime - mtime, me) is None:
            return True
        os.rename(path, path.with_name(f".{LOCK_FILE}.gone-{me['token']}"))
        print(f"hashmoe: warning: took over the run folder {path.parent} from {describe(holder)}: {reason}",
              file=sys.stderr, flush=True)
        with contextlib.suppress(OSError):
            path.with_name(f".{LOCK_FILE}.gone-{me['token']}").unlink()
        return True
    finally:
        with contextlib.suppress(OSError):
            breaker.unlink()
