"""Tests for trainer/run/metrics.py: metrics.jsonl rows, TensorBoard scalars and expert-load histograms, resume
truncation, the step timer and the load coefficient of variation."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from trainer.run.metrics import MetricsWriter, StepTimer, load_cv, read_metrics, truncate_metrics


def load_events(run_dir: Path) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(run_dir / "tb"), size_guidance={
        event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0})
    acc.Reload()
    return acc


def write_rows(run_dir: Path, rows: list[dict], torn: str = "") -> Path:
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)
    return path


# ---- MetricsWriter ------------------------------------------------------------------------------------
def test_writer_writes_jsonl_rows_and_tensorboard_scalars(tmp_path):
    run_dir = tmp_path / "run"
    writer = MetricsWriter(run_dir, enabled=True)
    writer.log(0, {"params/total": 1234, "train/flops_per_token": 6.5e6})
    writer.log(10, {"train/loss": torch.tensor(2.5), "train/lr": 1e-3, "moe/dropped": torch.tensor(3)})
    writer.log(20, {"train/loss": 2.25, "train/lr": 5e-4, "train/updates_per_sec": float("nan")})
    writer.close()

    rows = read_metrics(run_dir)
    assert math.isnan(rows[2].pop("train/updates_per_sec"))  # NaN is kept in the row (JSON NaN)
    assert rows == [
        {"step": 0, "params/total": 1234, "train/flops_per_token": 6.5e6},
        {"step": 10, "train/loss": 2.5, "train/lr": 1e-3, "moe/dropped": 3},
        {"step": 20, "train/loss": 2.25, "train/lr": 5e-4},
    ]
    assert type(rows[1]["train/loss"]) is float and type(rows[1]["moe/dropped"]) is int  # tensors -> numbers
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 10, 20]

    acc = load_events(run_dir)
    # non-finite values stay out of TensorBoard; "step" is the x axis, not a tag
    assert sorted(acc.Tags()["scalars"]) == ["moe/dropped", "params/total", "train/flops_per_token", "train/loss",
                                             "train/lr"]
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert scalars == {
        "params/total": [(0, 1234.0)],
        "train/flops_per_token": [(0, 6.5e6)],
        "train/loss": [(10, 2.5), (20, 2.25)],
        "train/lr": [(10, pytest.approx(1e-3)), (20, pytest.approx(5e-4))],  # float32 in the event file
        "moe/dropped": [(10, 3.0)],
    }


def test_writer_appends_to_an_existing_metrics_file(tmp_path):
    write_rows(tmp_path, [{"step": 10, "train/loss": 3.0}])
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    writer.log(20, {"train/loss": 2.0})
    writer.close()
    assert read_metrics(tmp_path) == [{"step": 10, "train/loss": 3.0}, {"step": 20, "train/loss": 2.0}]


def test_histogram_buckets_hold_the_expert_counts(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.histogram(10, "moe/expert_load/layer_0", torch.tensor([3, 0, 5, 2]))
    writer.histogram(20, "moe/expert_load/layer_0", torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    writer.histogram(10, "moe/expert_load/layer_1", torch.tensor([0.0, 7.0]))
    writer.flush()
    writer.close()

    acc = load_events(tmp_path)
    assert sorted(acc.Tags()["histograms"]) == ["moe/expert_load/layer_0", "moe/expert_load/layer_1"]
    first, second = acc.Histograms("moe/expert_load/layer_0")
    assert first.step == 10 and second.step == 20
    h = first.histogram_value
    assert list(h.bucket) == [3.0, 0.0, 5.0, 2.0]
    assert list(h.bucket_limit) == [0.5, 1.5, 2.5, 3.5]  # bucket e holds expert e
    assert (h.min, h.max, h.num) == (0.0, 3.0, 10.0)
    assert h.sum == 0 * 3 + 1 * 0 + 2 * 5 + 3 * 2
    assert h.sum_squares == 0 * 3 + 1 * 0 + 4 * 5 + 9 * 2
    assert list(second.histogram_value.bucket) == [1.0, 1.0, 1.0, 1.0]
    (layer_1,) = acc.Histograms("moe/expert_load/layer_1")
    assert list(layer_1.histogram_value.bucket) == [0.0, 7.0]


def test_disabled_writer_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    writer = MetricsWriter(run_dir, enabled=False)
    writer.log(1, {"train/loss": 1.0})
    writer.histogram(1, "moe/expert_load/layer_0", torch.tensor([1.0, 2.0]))
    writer.flush()
    writer.close()
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_writer_without_tensorboard_writes_only_jsonl(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    writer.log(1, {"train/loss": 1.0})
    writer.histogram(1, "moe/expert_load/layer_0", torch.tensor([1.0, 2.0]))
    writer.flush()
    writer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 1.0}]


# ---- read_metrics / truncate_metrics ------------------------------------------------------------------
def test_read_metrics_of_a_missing_file_is_empty(tmp_path):
    assert read_metrics(tmp_path) == []


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    rows = [{"step": 10, "train/loss": 3.0}, {"step": 20, "train/loss": 2.0}]
    write_rows(tmp_path, rows, torn='{"step": 30, "train/lo')
    assert read_metrics(tmp_path) == rows


def test_truncate_metrics_drops_rows_after_the_step(tmp_path):
    rows = [{"step": 0, "params/total": 10}, {"step": 10, "train/loss": 3.0}, {"step": 10, "valid/loss": 3.1},
            {"step": 20, "train/loss": 2.0}, {"step": 30, "train/loss": 1.5}]
    path = write_rows(tmp_path, rows, torn='{"step": 40, "train/lo')
    truncate_metrics(tmp_path, 10)
    assert read_metrics(tmp_path) == rows[:3]
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:3])  # the torn line is gone too
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no metrics.jsonl.tmp left
    truncate_metrics(tmp_path, 100)
    assert read_metrics(tmp_path) == rows[:3]
    truncate_metrics(tmp_path, -1)
    assert path.read_text() == ""


def test_truncate_metrics_without_a_file_does_nothing(tmp_path):
    truncate_metrics(tmp_path, 10)
    assert list(tmp_path.iterdir()) == []


# ---- StepTimer ----------------------------------------------------------------------------------------
def test_step_timer_excludes_paused_time():
    timer = StepTimer()
    timer.resume()
    time.sleep(0.1)
    timer.steps += 1
    timer.pause()
    time.sleep(0.6)  # evaluation / checkpoint: not counted
    timer.resume()
    time.sleep(0.1)
    timer.steps += 1
    seconds, steps = timer.window()
    assert steps == 2
    assert 0.19 <= seconds < 0.6  # 0.2 s timed; counting the 0.6 s pause would give >= 0.8


def test_step_timer_window_resets_and_keeps_running():
    timer = StepTimer()
    timer.resume()
    time.sleep(0.3)
    timer.steps += 3
    seconds, steps = timer.window()
    assert steps == 3 and 0.29 <= seconds < 0.8
    time.sleep(0.05)
    timer.steps += 1
    seconds, steps = timer.window()  # only the time and steps since the last window (not reset: >= 0.35)
    assert steps == 1 and 0.04 <= seconds < 0.3
    seconds, steps = timer.window()
    assert steps == 0 and seconds < 0.2


def test_step_timer_pause_without_resume_is_harmless():
    timer = StepTimer()
    timer.pause()
    timer.pause()
    assert (timer.total, timer.steps) == (0.0, 0)


# ---- load_cv ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("counts, expected", [
    ([5.0, 5.0, 5.0, 5.0], 0.0),  # balanced
    ([0.0, 4.0], 1.0),  # mean 2, population std 2
    ([0.0, 0.0, 0.0, 8.0], math.sqrt(3.0)),  # mean 2, std sqrt((3 * 4 + 36) / 4)
    ([0.0, 0.0, 0.0], 0.0),  # no tokens
    ([7.0], 0.0),
])
def test_load_cv(counts, expected):
    assert load_cv(torch.tensor(counts)) == pytest.approx(expected, abs=1e-12)
    assert load_cv(torch.tensor(counts).to(torch.int64)) == pytest.approx(expected, abs=1e-12)


def test_load_cv_returns_a_float():
    assert type(load_cv(torch.tensor([1, 3]))) is float


def test_peak_flops_is_known_by_device_name_and_only_on_a_gpu(monkeypatch):
    from trainer.run.metrics import peak_flops, peak_memory_mib

    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops(torch.device("cuda", 0)) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops(torch.device("cuda", 0)) is None
    before = peak_memory_mib(torch.device("cpu"))
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert peak_memory_mib(torch.device("cpu")) >= before and peak_memory_mib(torch.device("cpu")) > 64
    del block
