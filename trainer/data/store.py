"""The token store: one folder per fingerprint of what decides its bytes, prepared once, memory-mapped by
every rank.

    DATA_CACHE/<fingerprint>/            complete: renamed into place with its manifest written last
        manifest.json                    format, arrays (dtype, length, sha256), vocabulary, documents, tokens
        train.bin  valid.bin             the token streams (uint16 when the vocabulary fits, else uint32)
        train_docs.bin  valid_docs.bin   uint64 start offset of every document (text stores)
        token_counts.bin                 int64 [vocab]: unigram counts of the training stream (balanced hash)
        build.json                       how it was built (seconds, workers, host): the one file that varies
        tokenizer/
    DATA_CACHE/<fingerprint>.staging/    the lock: being built, with heartbeat.json rewritten every HEARTBEAT_S
                                         seconds, the store itself in build-<id>/ (this build's own folder)
    DATA_CACHE/<fingerprint>.failed.json the last failed build's error, for the ranks that wait for it

One builder at a time: taking the build is `mkdir` of the staging folder (atomic, also on NFS); whoever finds it
taken waits for the store, reading the heartbeat, and takes over a staging folder whose builder is gone (its
heartbeat stopped, or its process is dead on this host). Each build writes into its own build-<id>/ folder and
renames that one into place, so a builder wrongly judged gone (a suspended job, a stalled file system) finds its
folder deleted and fails, and never renames a half store into place. Nothing reads a store before its rename."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.errors import UserError
from trainer.fileio import process_state, this_process, write_text_atomic

STORE_FORMAT = 2  # 1: the safetensors cache of int64 blocks (before the store); bump when the bytes change
MANIFEST, BUILD_INFO, HEARTBEAT = "manifest.json", "build.json", "heartbeat.json"
HEARTBEAT_S = 5.0  # the builder rewrites its heartbeat this often
WAIT_REPORT_S = 60.0  # a waiting rank says what it waits for this often


class ArrayWriter:
    """A flat array appended to a file, with its sha256 and length kept as it grows."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self.file = open(path, "wb", buffering=1 << 22)
        self.sha256, self.length = hashlib.sha256(), 0

    def append(self, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype).tobytes()
        self.file.write(data)
        self.sha256.update(data)
        self.length += len(values)

    def close(self) -> dict:
        self.file.close()
        return {"dtype": self.dtype.name, "length": self.length, "sha256": self.sha256.hexdigest()}


class Heartbeat:
    """The builder's sign of life: STAGING/heartbeat.json, rewritten every HEARTBEAT_S seconds with its
    progress, by a thread (a long tokenizer training or a slow file system read does not stop it)."""

    def __init__(self, staging: Path, build_dir: Path):
        self.path, self.build_dir, self.progress = staging / HEARTBEAT, build_dir, {"stage": "starting"}
        self.identity = {**this_process(), "build": build_dir.name}
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="hashmoe-store-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        if not self.build_dir.is_dir():  # taken over: the lock folder is another build's now
            return
        with contextlib.suppress(OSError):
            write_text_atomic(self.path, json.dumps({**self.identity, "time": time.time(), **self.progress}))

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class StorePaths:
    target: Path

    @property
    def staging(self) -> Path:
        return self.target.with_name(self.target.name + ".staging")

    @property
    def failed(self) -> Path:
        return self.target.with_name(self.target.name + ".failed.json")

    def complete(self) -> bool:
        return (self.target / MANIFEST).is_file()

    def heartbeat(self) -> dict | None:
        try:
            return json.loads((self.staging / HEARTBEAT).read_text())
        except (OSError, ValueError):
            return None

    def failure(self) -> str | None:
        """The failure marker as written (each failure's is unique: compare it to tell a new one), or None."""
        try:
            return self.failed.read_text()
        except OSError:
            return None

    def record_failure(self, message: str) -> None:
        """Tell the processes waiting for this store that its build failed, and why."""
        with contextlib.suppress(OSError):
            write_text_atomic(self.failed, json.dumps({"message": message, "id": uuid.uuid4().hex}))


def failure_message(marker: str) -> str:
    try:
        return json.loads(marker)["message"]
    except (ValueError, KeyError, TypeError):
        return marker


def _describe_heartbeat(beat: dict | None) -> str:
    if not beat:
        return "no heartbeat yet"
    done = f", {beat['text_mb']:.0f} MB read, {beat['tokens']:,} tokens" if "tokens" in beat else ""
    return f"{beat['host']} pid {beat['pid']}: {beat.get('stage', '?')}{done}"


def wait_for_store(paths: StorePaths, timeout_s: float, failure_before: str | None, who: str,
                   dead_pid_stops: bool = True) -> str:
    """Wait until the store is complete; "complete", "failed: MESSAGE" (a failure that appeared while
    waiting), "stopped" (the heartbeat stopped changing for timeout_s, or its process is dead on this host) or
    "absent" (no staging folder appeared within timeout_s). Says every WAIT_REPORT_S what it waits for.
    `dead_pid_stops` False: a dead builder is no reason to stop (a rank waiting for rank 0, which may be about to
    take over that builder's folder: the heartbeat changes then)."""
    start = last_report = last_change = time.monotonic()
    seen = None
    while True:
        if paths.complete():
            return "complete"
        failure = paths.failure()
        if failure is not None and failure != failure_before:
            return f"failed: {failure_message(failure)}"
        beat = paths.heartbeat()
        now = time.monotonic()
        if beat is not None and beat != seen:
            seen, last_change = beat, now
        if dead_pid_stops and beat is not None and process_state(beat) == "dead":
            return "stopped"
        if now - last_change > timeout_s:
            return "stopped" if seen is not None or paths.staging.exists() else "absent"
        if now - last_report >= WAIT_REPORT_S:
            last_report = now
            print(f"hashmoe: {who} waits for the data store {paths.target} ({_describe_heartbeat(beat)}; "
                  f"{now - start:.0f} s so far)", file=sys.stderr, flush=True)
        time.sleep(0.25)


def _failure_error(paths: StorePaths, status: str) -> UserError:
    return UserError("data", f"preparing the data store {paths.target} failed elsewhere: {status[8:]}",
                     "Fix that and run again", all_ranks=True)


def build_once(paths: StorePaths, build, timeout_s: float) -> bool:
    """Make sure the store exists: build it with `build(staging, progress_dict)` unless it is complete, or another
    process builds it (then wait). True if this process built it."""
    try:
        paths.target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unwritable(paths, err) from None
    while not paths.complete():
        try:
            paths.staging.mkdir()
        except FileExistsError:
            before = paths.failure()
            status = wait_for_store(paths, timeout_s, before, "this process")
            if status.startswith("failed"):
                raise _failure_error(paths, status) from None
            if status in ("stopped", "absent"):  # its builder is gone: put its half store aside, then retry
                aside = paths.target.with_name(f"{paths.target.name}.abandoned-{uuid.uuid4().hex[:8]}")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(paths.staging, aside)
                    print(f"hashmoe: took over the data store {paths.target}: its builder stopped ({status})",
                          file=sys.stderr, flush=True)
                shutil.rmtree(aside, ignore_errors=True)
            continue
        except OSError as err:
            raise _unwritable(paths, err) from None
        if paths.target.exists():  # a folder without a manifest (an interrupted delete): not a store, put aside
            aside = paths.target.with_name(f"{paths.target.name}.incomplete-{uuid.uuid4().hex[:8]}")
            os.rename(paths.target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        _build_in(paths, build)
        return True
    return False


def _unwritable(paths: StorePaths, err: OSError) -> UserError:
    return UserError("data.cache_dir", f"cannot create the data store under {paths.target.parent} "
                     f"({err.strerror or err})", "Point data.cache_dir at a folder you can write (shared by the nodes)")


def _build_in(paths: StorePaths, build) -> None:
    with contextlib.suppress(FileNotFoundError):
        paths.failed.unlink()
    paths.staging.chmod(0o755)
    build_dir = paths.staging / f"build-{uuid.uuid4().hex[:12]}"
    build_dir.mkdir(mode=0o755)
    heartbeat = Heartbeat(paths.staging, build_dir)
    try:
        build(build_dir, heartbeat.progress)
        heartbeat.stop()
        os.rename(build_dir, paths.target)  # fails if this build was taken over: its folder is gone
        _release(paths, build_dir)
    except BaseException as err:
        heartbeat.stop()
        shutil.rmtree(build_dir, ignore_errors=True)
        if not _release(paths, build_dir):  # taken over meanwhile: the lock and its news are another build's
            raise
        if isinstance(err, UserError):
            message = f"{err.key}: {err.problem}. {err.fix}"
        elif isinstance(err, KeyboardInterrupt):
            message = "interrupted (Ctrl-C)"
        else:
            message = f"{type(err).__name__}: {err}"
        paths.record_failure(message)
        if isinstance(err, OSError) and err.errno == 28:  # ENOSPC
            raise UserError("data.cache_dir", f"the disk holding {paths.target.parent} is full (nothing of the "
                            "store was kept)", "Free space there, or point data.cache_dir at a larger disk") from None
        raise


def _release(paths: StorePaths, build_dir: Path) -> bool:
    """Remove the lock folder if it is still this build's (its heartbeat names the build); True if it was."""
    beat = paths.heartbeat()
    if beat is None or beat.get("build") != build_dir.name:
        return False
    shutil.rmtree(paths.staging, ignore_errors=True)
    return True


def write_array(path: Path, dtype, values: np.ndarray) -> dict:
    """A whole array in one go; its manifest entry."""
    writer = ArrayWriter(path, dtype)
    writer.append(values)
    return writer.close()


def write_manifest(staging: Path, manifest: dict, started: float, workers: int) -> None:
    """manifest.json last (it completes the store), after build.json: how it was built, the one file whose bytes
    vary between two builds of a store (`started`: the build's time.perf_counter() at its start)."""
    build_info = {"seconds": time.perf_counter() - started, "workers": workers, "host": socket.gethostname(),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (staging / BUILD_INFO).write_text(json.dumps(build_info, indent=1) + "\n")
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


class Store:
    """A complete store, read-only: arrays are memory-mapped (pages are the page cache's, shared by every rank
    of a node; nothing is copied into a rank's own memory)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        if self.manifest.get("format") != STORE_FORMAT:
            raise UserError("data.cache_dir", f"the store {self.folder} has format {self.manifest.get('format')}, "
                            f"this hashmoe reads {STORE_FORMAT}", "Delete that folder; it is prepared again")
        for name, entry in self.manifest["arrays"].items():
            size = (self.folder / f"{name}.bin").stat().st_size if (self.folder / f"{name}.bin").exists() else -1
            if size != entry["length"] * np.dtype(entry["dtype"]).itemsize:
                raise UserError("data.cache_dir", f"{self.folder / name}.bin has {size} bytes, its manifest says "
                                f"{entry['length']} x {entry['dtype']}", "The store is damaged: delete "
                                f"{self.folder} and run `hashmoe prepare` again")

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / "tokenizer"

    def array(self, name: str) -> np.ndarray:
        entry = self.manifest["arrays"][name]
        if entry["length"] == 0:
            return np.empty(0, dtype=entry["dtype"])
        return np.memmap(self.folder / f"{name}.bin", dtype=entry["dtype"], mode="r", shape=(entry["length"],))

    def has(self, name: str) -> bool:
        return name in self.manifest["arrays"]

    def verify(self) -> list[str]:
        """Names of the arrays whose sha256 differs from the manifest (reads every byte)."""
        damaged = []
        for name, entry in self.manifest["arrays"].items():
            digest = hashlib.sha256()
            with open(self.folder / f"{name}.bin", "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
            if digest.hexdigest() != entry["sha256"]:
                damaged.append(name)
        return damaged
