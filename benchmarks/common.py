"""Shared pieces of the benchmark suites: the machine and versions, waiting for a quiet machine, timing,
markdown tables, and appending one section per measured run to BENCHMARKS.md.

Every suite is a module with `main(argv)` taking `--quick` (tiny sizes, a smoke run, never written),
`--no-write` (print only) and `--command` (the command line to record; `hashmoe bench` passes its own).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "BENCHMARKS.md"
HEADER = """\
# hashmoe benchmarks

Measured results of the suites in `benchmarks/` (how to run them: `benchmarks/README.md`). Each section
below is one measured run, appended by `hashmoe bench --suite SUITE`, with the machine, the date (UTC), the
library versions and the exact command. Absolute times depend on the machine and on whatever else it was
running; **a ratio measured within one run beats a comparison of absolute times across runs** (or across
sections). The 1-minute load average seen just before measuring is recorded with each run.
"""
# Time on a shared machine is only worth recording when it is quiet (2 cores here: load < ~1.3).
QUIET_LOAD = 1.3
MAX_WAIT_S = 600
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID",
                      "SLURM_NTASKS", "SLURM_STEP_ID")


# ---- command line ---------------------------------------------------------------------------------------
def parse_args(suite: str, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{suite}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few steps (a smoke run); implies --no-write")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not touch BENCHMARKS.md")
    parser.add_argument("--command", help="command line to record (default: this module's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (the layer suite)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="fp32 (default) or bf16")
    args = parser.parse_args(argv)
    if args.command is None:
        args.command = " ".join(["python -m", f"benchmarks.{suite}", *(argv if argv is not None else sys.argv[1:])])
    args.write = not (args.quick or args.no_write)
    return args


# ---- machine --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch.get_num_threads()={torch.get_num_threads()}, "
            f"{gpu}")


def versions_line() -> str:
    parts = [f"python {platform.python_version()}"]
    for package in ("torch", "deepspeed", "transformers", "scipy"):
        try:
            parts.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{package} (not installed)")
    return ", ".join(parts)


def load_average() -> float:
    return os.getloadavg()[0]


def wait_until_quiet(quick: bool, threshold: float = QUIET_LOAD, max_wait_s: float = MAX_WAIT_S) -> float:
    """Sleep until the 1-minute load average drops below `threshold` (at most `max_wait_s`), and return the
    load seen when measuring starts. A smoke run (`quick`) does not wait."""
    load = load_average()
    if quick or load < threshold:
        return load
    print(f"bench: load average {load:.2f} >= {threshold}; waiting up to {max_wait_s:.0f} s for a quiet "
          "machine", flush=True)
    deadline = time.monotonic() + max_wait_s
    while load >= threshold and time.monotonic() < deadline:
        time.sleep(15)
        load = load_average()
    if load >= threshold:
        print(f"bench: still loaded ({load:.2f}); measuring anyway, the section records it", flush=True)
    return load


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores; hypervisor steal counts as busy)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its children that have finished."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """How much CPU other processes took during an interval, in cores: the machine's busy time minus ours,
    over the wall time. 0 = we had the machine to ourselves; 1 = one core's worth went elsewhere."""

    def __init__(self):
        self.available = Path("/proc/stat").is_file()
        self.start()

    def start(self) -> None:
        self._busy = cpu_busy_seconds() if self.available else 0.0
        self._own, self._wall = own_cpu_seconds(), time.monotonic()

    def cores(self) -> float:
        if not self.available:
            return 0.0
        wall = time.monotonic() - self._wall
        others = (cpu_busy_seconds() - self._busy) - (own_cpu_seconds() - self._own)
        # Both clocks count in ticks (1/CLK_TCK s) and tick at different moments: allow two ticks of error,
        # or a round of a few ms reads as several cores of "other" load.
        others -= 2.0 / os.sysconf("SC_CLK_TCK")
        return max(0.0, others / wall) if wall > 0 else 0.0


class QuietRounds:
    """Run measurement rounds until `needed` of them ran while other processes took at most
    `max_other_cores` of the CPUs. Rounds are judged in windows of at least `window_s` of wall time (the two
    clocks tick every 10 ms: a single round of a few ms cannot show another process). A loaded window is
    dropped and, after a pause for the other job to pass, repeated; after `max_pause_s` of pausing, windows are
    kept whatever the load (and counted as such). A smoke run (`quick`) keeps every window but still counts
    the loaded ones, so its section says when it was disturbed."""

    def __init__(self, quick: bool, max_other_cores: float = 0.25, pause_s: float = 20.0,
                 max_pause_s: float = 900.0, window_s: float = 0.25):
        self.quick, self.max_other_cores, self.window_s = quick, max_other_cores, window_s
        self.pause_s, self.pause_left = pause_s, max_pause_s
        self.dropped = 0  # rounds measured under load and repeated
        self.kept_loaded = 0  # rounds kept under load (pause budget spent, or a smoke run)
        self.worst = 0.0  # the most other processes took in any window, in cores
        self.monitor = OtherLoad()

    def run(self, round_fn: Callable[[], object], needed: int) -> list:
        results = []
        while len(results) < needed:
            self.monitor.start()
            started, window = time.monotonic(), []
            while len(results) + len(window) < needed and (not window or time.monotonic() - started < self.window_s):
                window.append(round_fn())
            others = self.monitor.cores()
            self.worst = max(self.worst, others)
            if others <= self.max_other_cores:
                results += window
            elif self.quick or self.pause_left <= 0:
                self.kept_loaded += len(window)
                results += window
            else:
                self.dropped += len(window)
                print(f"bench: other processes took {others:.2f} cores during {len(window)} round(s); dropped, "
                      f"pausing {self.pause_s:.0f} s", flush=True)
                time.sleep(self.pause_s)
                self.pause_left -= self.pause_s
        return results

    def note(self) -> str:
        text = (f"Rounds during which other processes took more than {self.max_other_cores} cores (machine busy "
                f"time minus this process's, /proc/stat) were dropped and repeated: {self.dropped} dropped")
        if self.kept_loaded:
            text += (f"; {self.kept_loaded} kept under load ({'a smoke run does not repeat' if self.quick else 'the pause budget ran out'}"
                     f", up to {self.worst:.2f} cores elsewhere): their timings are not to be trusted")
        return text + "."


def launcher_free_env(**extra: str) -> dict:
    """This process's environment without any launcher's rank variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.update(extra)
    return env


# ---- timing ---------------------------------------------------------------------------------------------
@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.seconds)

    @property
    def iqr_ms(self) -> float:
        """Interquartile range in ms: the spread of the steps, to judge a ratio's noise."""
        if len(self.seconds) < 4:
            return 1e3 * (max(self.seconds) - min(self.seconds))
        q = statistics.quantiles(self.seconds, n=4)
        return 1e3 * (q[2] - q[0])


def time_calls(fn: Callable[[], object], steps: int, warmup: int, rounds: QuietRounds | None = None) -> Timing:
    """Run `fn` warmup + steps times (each call one round of `rounds`, if given); the last `steps` timings."""

    def one() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    seconds = [one() for _ in range(warmup + steps)] if rounds is None else rounds.run(one, warmup + steps)
    return Timing(seconds[warmup:])


# ---- output ---------------------------------------------------------------------------------------------
def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Report:
    """One measured run of a suite: printed, and appended to BENCHMARKS.md unless --quick / --no-write."""

    title: str
    command: str
    load_before: float
    tables: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines = [f"## {self.title}", "",
                 f"- date: {now}",
                 f"- machine: {machine_line()}",
                 f"- versions: {versions_line()}",
                 f"- command: `{self.command}`",
                 f"- load average (1 min): {self.load_before:.2f} before measuring, "
                 f"{load_average():.2f} after", ""]
        for table in self.tables:
            lines += [table, ""]
        if self.notes:
            lines += ["Notes:", ""] + [f"- {note}" for note in self.notes] + [""]
        return "\n".join(lines)

    def emit(self, write: bool) -> None:
        text = self.markdown()
        print(text, flush=True)
        if write:
            append_section(text)
            print(f"bench: appended to {RESULTS}", flush=True)
        else:
            print("bench: not written (--quick / --no-write)", flush=True)


def append_section(text: str, path: Path = RESULTS) -> None:
    existing = path.read_text() if path.exists() else HEADER
    path.write_text(existing.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")
