"""Metrics of a run: one JSON object per logging step in metrics.jsonl, the same scalars as TensorBoard tags,
expert-load histograms, and a rank-0 progress bar. Names are the contract of design.md (`train/loss`, ...).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from trainer.fileio import write_text_atomic

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity), matched on the device name; MFU is logged
# only where the peak is known.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far: CUDA memory allocated by torch on a GPU, the peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


class MetricsWriter:
    """Writes only where `enabled` (rank 0); other ranks get a writer that does nothing."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, resume_step: int | None = None):
        """`resume_step`: the step of the checkpoint training continues from, 0 for a new run, None to append
        as is. Every row logged after that step by an interrupted run is dropped (from metrics.jsonl, and
        purged from TensorBoard's view), so no step is ever recorded twice."""
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # the last step kept: a new run keeps nothing (step 0 is logged again), a resumed one what its
        # checkpoint covers
        kept_through = None if resume_step is None else resume_step if resume_step > 0 else -1
        if kept_through is not None:
            truncate_metrics(run_dir, kept_through)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"),
                                    purge_step=None if kept_through is None else kept_through + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for tag, value in row.items():
                if tag != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(tag, value, step)

    def histogram(self, step: int, tag: str, counts_E: torch.Tensor) -> None:
        """Expert load as a histogram over expert ids (bucket e holds expert e's token count)."""
        if not self.enabled or self.tb is None:
            return
        counts = counts_E.detach().double().cpu()
        num = counts.numel()
        self.tb.add_histogram_raw(tag, min=0.0, max=float(num - 1), num=float(counts.sum()),
                                  sum=float((counts * torch.arange(num)).sum()),
                                  sum_squares=float((counts * torch.arange(num) ** 2).sum()),
                                  bucket_limits=[e + 0.5 for e in range(num)], bucket_counts=counts.tolist(),
                                  global_step=step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    return float(value) if isinstance(value, float) else value


def read_metrics(run_dir: Path) -> list[dict]:
    """All rows of a run's metrics.jsonl (a missing file is an empty run; a torn last line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """On resume from step k, drop rows logged after k by the interrupted run so the curve is not doubled."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        kept = [json.dumps(r) for r in read_metrics(run_dir) if r.get("step", 0) <= after_step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))


class StepTimer:
    """Wall time of optimizer steps only: evaluation and checkpointing run between `pause()` and `resume()`,
    so updates per second are not flattered or penalised by them (design.md)."""

    def __init__(self):
        self.total = 0.0
        self.steps = 0
        self._since = None

    def resume(self) -> None:
        self._since = time.perf_counter()

    def pause(self) -> None:
        if self._since is not None:
            self.total += time.perf_counter() - self._since
            self._since = None

    def window(self) -> tuple[float, int]:
        """(seconds, steps) since the last call; the clock keeps running."""
        self.pause()
        seconds, steps = self.total, self.steps
        self.total, self.steps = 0.0, 0
        self.resume()
        return seconds, steps


def load_cv(tokens_per_expert_E: torch.Tensor) -> float:
    """Coefficient of variation of tokens per expert: 0 = perfectly balanced."""
    counts = tokens_per_expert_E.double()
    mean = counts.mean()
    return float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0
