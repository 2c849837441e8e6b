"""Tests of `hashmoe compare` on run folders written here (config.yaml, metrics.jsonl through MetricsWriter,
summary.json, expert-load histograms in TensorBoard): no training. The five runs are a dense baseline, a hash
run, a switch run that drops tokens and was stopped early, an unfinished hash run without evaluation, and a
missing folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from trainer.analysis.compare import collect_run, compare_runs
from trainer.run.metrics import MetricsWriter

ROOT = Path(__file__).resolve().parents[3]
TOKENS_PER_STEP = 2048
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, model: dict, rates: list[float], ppls: dict[int, float],
             dropped: list[float] | None = None, summary: dict | None = None, elapsed: bool = True) -> Path:
    """A run folder as trainer/run/steps.py writes it: training rows every 10 steps at `rates` updates/s, eval rows
    at the steps of `ppls`, one expert-load histogram per MoE layer per window."""
    run_dir = root / name
    config = {"run": {"name": name, "output_dir": str(run_dir), "seed": 1},
              "model": {"hidden_size": 32, **model}, "data": {"seq_len": 64},
              "optim": {"lr": 0.002, "max_steps": 40}}
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    moe_layers = model.get("moe_layers", [])
    writer = MetricsWriter(run_dir, enabled=True, tensorboard=bool(moe_layers))
    writer.log(0, {"params/total": 3_164_416, "params/trainable": 3_000_000, "params/frozen": 164_416,
                   "params/active": 1_329_408, "params/active_non_embedding": 788_736,
                   "train/flops_per_token": 1000.0})
    experts = model.get("num_experts", 8)
    for i, rate in enumerate(rates):
        step = 10 * (i + 1)
        row = {"train/loss": 5.0, "train/updates_per_sec": rate, "train/tokens_per_sec": rate * TOKENS_PER_STEP,
               "train/flops_per_sec": rate * TOKENS_PER_STEP * 1000.0, "moe/aux_loss": 0.0}
        if elapsed:  # the command's wall clock: 30 s per window, set-up and evaluation included
            row["time/elapsed_s"] = 30.0 * (i + 1)
        if moe_layers:
            row |= {"moe/dropped_frac": dropped[i] if dropped else 0.0, "moe/load_cv": 0.1,
                    "moe/load_cv_chosen": 0.3 + 0.1 * i}
            for layer in range(len(moe_layers)):
                # Final window: expert 0 takes 3 shares, the others 1 each.
                counts = torch.ones(experts) * (step if i < len(rates) - 1 else 1)
                counts[0] *= 3
                writer.histogram(step, f"moe/expert_load/layer_{layer}", counts)
        writer.log(step, row)
        if step in ppls:
            writer.log(step, {"valid/loss": 1.0, "valid/ppl": ppls[step]})
    writer.close()
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    finished = {"step": 40, "stopped_early": False}
    return [
        make_run(root, "dense", {"moe_layers": []}, [1.0, 3.0, 3.0, 3.0], {20: 120.0, 40: 100.0}, summary=finished),
        make_run(root, "hash", {"moe_layers": [1], "num_experts": 4, "router": "hash"}, [1.0, 2.0, 2.0, 4.0],
                 {20: 100.0, 40: 80.0}, summary=finished),
        make_run(root, "switch", {"moe_layers": [1], "num_experts": 4, "router": "switch"}, [0.5, 1.0, 2.0],
                 {20: 90.0, 30: 95.0}, dropped=[0.1, 0.2, 0.3], summary={"step": 30, "stopped_early": True}),
        make_run(root, "unfinished", {"moe_layers": [1], "num_experts": 8, "router": "hash"}, [1.0, 1.0], {},
                 elapsed=False),
        root / "missing",
    ]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    return compare_runs(runs, tmp_path_factory.mktemp("report"))


def table(text: str) -> dict[str, dict[str, str]]:
    """The markdown table as {run label: {column: cell}}."""
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    return {row[0]: dict(zip(header, row)) for row in body}


def test_collect_run_numbers(runs):
    run = collect_run(runs[1])
    assert run.status == "finished"
    # 40 steps in 10 + 5 + 5 + 2.5 optimizer seconds: not the mean of the windows' rates (2.25, or 8/3
    # without the first), which overweights the fast windows
    assert run.updates_per_sec == pytest.approx(40 / 22.5)
    assert run.tokens_per_sec == pytest.approx(40 / 22.5 * TOKENS_PER_STEP)
    assert run.tokens_per_step == pytest.approx(TOKENS_PER_STEP)
    assert run.wall_seconds == pytest.approx(120.0)  # the last time/elapsed_s
    assert run.train_time[-1] == (40, pytest.approx(10 + 5 + 5 + 2.5))
    assert run.valid == [(20, 100.0), (40, 80.0)]
    assert run.expert_load == [[3.0, 1.0, 1.0, 1.0]]  # the last histogram only
    switch = collect_run(runs[2])
    assert switch.dropped_frac == pytest.approx(0.2)
    assert switch.updates_per_sec == pytest.approx(30 / 35)
    unfinished = collect_run(runs[3])
    assert unfinished.wall_seconds is None and any("wall time unknown" in n for n in unfinished.notes)
    assert collect_run(runs[4]).status == "missing"


def test_table_rows_labels_and_statuses(report):
    text = report.read_text()
    assert "Differing config keys: `model.moe_layers`, `model.num_experts`, `model.router`\n" in text
    rows = table(text)
    assert list(rows) == ["moe_layers=[]", "moe_layers=[1], num_experts=4, router=hash",
                          "moe_layers=[1], num_experts=4, router=switch",
                          "moe_layers=[1], num_experts=8, router=hash", "missing"]
    dense, hashed, switch, unfinished, missing = rows.values()
    assert (dense["router"], dense["hash function"], dense["experts"]) == ("-", "-", "dense")
    assert (hashed["router"], hashed["hash function"], hashed["experts"]) == ("hash", "balanced", "4")
    assert (switch["router"], switch["hash function"], switch["experts"]) == ("switch", "-", "4")
    assert (hashed["params total"], hashed["params trainable"], hashed["params active"]) == ("3.16M", "3.00M",
                                                                                           "1.33M")
    assert (hashed["updates/s"], hashed["tokens/s"], hashed["wall time"]) == ("1.78", "3,641", "2m00s")
    assert (hashed["final valid ppl"], hashed["best valid ppl"]) == ("80.00", "80.00")
    assert (switch["final valid ppl"], switch["best valid ppl"]) == ("95.00", "90.00")
    # the mean over windows and the last window; the load before capacity (chosen) and after it (kept)
    assert switch["dropped frac mean / final"] == "0.2000 / 0.3000"
    assert switch["load CV final (chosen / kept)"] == "0.500 / 0.100"
    assert (switch["eval capacity"], hashed["eval capacity"]) == ("none", "-")  # today's default: no capacity
    assert (dense["dropped frac mean / final"], dense["load CV final (chosen / kept)"], dense["updates/s"]) == (
        "-", "-", "2.00")
    assert (unfinished["updates/s"], unfinished["wall time"]) == ("1.00", "-")
    assert (unfinished["final valid ppl"], unfinished["best valid ppl"]) == ("-", "-")
    assert missing["params total"] == missing["updates/s"] == "-"
    assert [r["status"] for r in rows.values()] == ["finished", "finished", "stopped early", "unfinished",
                                                    "missing"]
    notes = text.split("## Notes")[1].split("##")[0]
    assert "- missing: folder not found" in notes
    assert "num_experts=8, router=hash: unfinished: no summary.json" in notes
    assert "num_experts=8, router=hash: no evaluation rows" in notes
    for name in ("valid_ppl_vs_step.png", "valid_ppl_vs_time.png", "valid_ppl_vs_flops.png",
                 "updates_per_sec.png", "expert_load.png"):
        assert f"]({name})" in text


def test_plots_are_png(report):
    for name in ("valid_ppl_vs_step.png", "valid_ppl_vs_time.png", "valid_ppl_vs_flops.png",
                 "updates_per_sec.png", "expert_load.png"):
        data = (report.parent / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 1024, name


def test_labels_router_only_and_folder_fallback(runs, tmp_path):
    rows = table(compare_runs(runs[1:3], tmp_path / "a").read_text())
    assert list(rows) == ["router=hash", "router=switch"]
    shutil.copytree(runs[1], tmp_path / "hash_copy")
    same = compare_runs([runs[1], tmp_path / "hash_copy"], tmp_path / "b").read_text()
    assert "Differing config keys: none (runs labelled by folder name)" in same
    assert list(table(same)) == ["hash", "hash_copy"]


def test_labels_by_name_tell_apart_runs_of_one_name(runs, tmp_path):
    """Two folders of one run.name (a copy trained again elsewhere): the folder is added to the label."""
    shutil.copytree(runs[1], tmp_path / "a" / "hash")
    shutil.copytree(runs[1], tmp_path / "b" / "hash-again")
    text = compare_runs([tmp_path / "a" / "hash", tmp_path / "b" / "hash-again"], tmp_path / "out",
                        label_by="name").read_text()
    assert list(table(text)) == ["hash", "hash (hash-again)"]
    shutil.copytree(runs[1], tmp_path / "c" / "hash")
    text = compare_runs([tmp_path / "a" / "hash", tmp_path / "c" / "hash"], tmp_path / "out2",
                        label_by="name").read_text()
    assert list(table(text)) == [f"hash ({tmp_path / 'a' / 'hash'})", f"hash ({tmp_path / 'c' / 'hash'})"]


def test_folder_without_metrics(tmp_path, runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    run = collect_run(empty)
    assert run.status == "missing" and "no metrics.jsonl" in run.notes[0]


def hashmoe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_compare(runs, tmp_path):
    out = tmp_path / "out"
    result = hashmoe("compare", str(runs[1]), str(runs[2]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "| router=hash | hash | balanced |" in result.stdout
    assert "| router=switch | switch | - |" in result.stdout
    assert (out / "report.md").is_file()


def test_cli_compare_only_missing_runs(tmp_path):
    result = hashmoe("compare", str(tmp_path / "nope1"), str(tmp_path / "nope2"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "hashmoe: error: RUN_DIR:" in result.stderr and "nope1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_task_runs_show_exact_match_and_passes_and_can_be_labelled_by_name(tmp_path):
    plain = make_run(tmp_path, "walk-plain", {"moe_layers": []}, [2.0, 2.0, 2.0], {30: 1.5},
                     summary={"step": 30, "stopped_early": False})
    stair = make_run(tmp_path, "walk-staircase", {"moe_layers": [], "recurrence": {"kind": "staircase", "chunk": 8,
                                                                                  "window": 32}},
                     [1.0, 1.0, 1.0], {30: 1.1}, summary={"step": 30, "stopped_early": False})
    for run_dir, errors in ((plain, [0.6, 0.5]), (stair, [0.3, 0.05])):
        with (run_dir / "metrics.jsonl").open("a") as f:
            for step, error in zip((20, 30), errors):
                f.write(json.dumps({"step": step, "valid/exact_match_error": error, "valid/token_error": error}) + "\n")
    text = compare_runs([plain, stair], tmp_path / "out", label_by="name").read_text()
    rows = table(text)
    assert set(rows) == {"walk-plain", "walk-staircase"}
    assert rows["walk-staircase"]["passes per token"] == "4" and rows["walk-plain"]["passes per token"] == "1"
    assert rows["walk-staircase"]["final exact-match error"] == "0.050"
    assert rows["walk-plain"]["best exact-match error"] == "0.500"
    assert (tmp_path / "out" / "final_vs_params.png").read_bytes().startswith(PNG_MAGIC)


def test_runs_differing_only_by_seed_are_one_group_with_mean_and_std(tmp_path):
    """Seeds as an axis: three seeds of one config become one row "mean ± std (n)" and a band in a plot; a run of
    another config stays alone."""
    finished = {"step": 40, "stopped_early": False}
    folders = []
    for seed, final in ((1, 80.0), (2, 90.0), (3, 100.0)):
        folder = make_run(tmp_path, f"hash-s{seed}", {"moe_layers": [1], "num_experts": 4, "router": "hash"},
                          [2.0, 2.0, 2.0, 2.0], {20: 120.0, 40: final}, summary=finished)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config["run"]["seed"] = seed
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        folders.append(folder)
    folders.append(make_run(tmp_path, "dense", {"moe_layers": []}, [3.0, 3.0, 3.0, 3.0], {20: 130.0, 40: 110.0},
                            summary=finished))
    report = compare_runs(folders, tmp_path / "report")
    assert "## Ordering over training" not in report.read_text()  # one group: no ranking
    text = report.read_text()
    across = text.split("## Across seeds")[1].split("\n\n", 2)[2]
    rows = [line for line in across.splitlines() if line.startswith("| ") and not line.startswith("| group")]
    assert len(rows) == 1, rows  # dense has one seed: no group
    cells = [c.strip() for c in rows[0].strip("|").split(" | ")]
    assert cells[1] == "1, 2, 3"
    assert cells[2] == "90.00 ± 10.00 (3)" and cells[3] == "90.00 ± 10.00 (3)" and cells[4] == "2.00 ± 0.00 (3)"
    assert (tmp_path / "report" / "valid_ppl_across_seeds.png").stat().st_size > 1000
    assert "valid_ppl_across_seeds.png" in text

    # a second seed of dense: two groups, ranked at each shared evaluation step
    dense2 = make_run(tmp_path, "dense-s2", {"moe_layers": []}, [3.0] * 4, {20: 70.0, 40: 110.0}, summary=finished)
    config = yaml.safe_load((dense2 / "config.yaml").read_text())
    config["run"]["seed"] = 99
    (dense2 / "config.yaml").write_text(yaml.safe_dump(config))
    text = compare_runs(folders + [dense2], tmp_path / "report2").read_text()
    ordering = text.split("## Ordering over training")[1]
    assert "The ranking last changed at step 40 (of 40)." in ordering
    ranks = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:] for line in ordering.splitlines()
             if line.startswith("| ") and "---" not in line and not line.startswith("| group")}
    # step 20: dense 100 (mean of 130, 70) beats hash 120; step 40: hash 90 beats dense 110
    assert sorted(ranks.values()) == [["1", "2"], ["2", "1"]], ranks


def test_oracle_future_is_labelled_an_upper_bound_and_modern_baselines_are_named():
    from trainer.analysis.compare import RunSummary, table_row

    def row(**model):
        config = {f"model.{k}": v for k, v in {"moe_layers": [1], "num_experts": 4, **model}.items()}
        return table_row(RunSummary(path=Path("x"), status="finished", config=config, label="x"))

    assert "upper bound" in row(router="hash", hash_function="oracle_future")[2]
    assert "upper bound" not in row(router="hash", hash_function="random")[2]
    assert row(router="hash", hash_function="random", hash_gate="sqrtsoftplus")[2] == (
        "random, gate sqrtsoftplus (DeepSeek-V4)")
    assert row(router="switch", router_bias_update_rate=0.001)[1] == "switch + bias balancing (0.001)"
    # DeepSeek-V4's layout: a router per MoE layer, named run by run; the hash layers' table of k experts
    v4 = row(router=["hash", "hash", "hash", "topk"], moe_layers=[0, 1, 2, 3], hash_function="random",
             hash_experts_per_tok=2, hash_gate="sqrtsoftplus")
    assert v4[1] == "hash x3 + topk"
    assert v4[2] == "random (2 experts per token), gate sqrtsoftplus (DeepSeek-V4)"


def test_a_key_only_some_runs_have_is_a_difference_unless_pruning_explains_it(tmp_path):
    """A ladder (model.recurrence.kind/steps) against the same model without recurrence (model.recurrence: None):
    the labels must differ; a dense run's missing router keys are pruning, not a difference."""
    finished = {"step": 40, "stopped_early": False}
    plain = make_run(tmp_path, "plain", {"moe_layers": []}, [2.0] * 4, {40: 100.0}, summary=finished)
    ladder = make_run(tmp_path, "ladder", {"moe_layers": [], "recurrence": {"kind": "ladder", "steps": 2}},
                      [2.0] * 4, {40: 110.0}, summary=finished)
    hashed = make_run(tmp_path, "hashed", {"moe_layers": [1], "num_experts": 4, "router": "hash"}, [2.0] * 4,
                      {40: 90.0}, summary=finished)
    text = compare_runs([plain, ladder, hashed], tmp_path / "report").read_text()
    keys = text.split("Differing config keys: ")[1].splitlines()[0]
    assert "`model.recurrence.kind`" in keys and "`model.router`" not in keys  # dense lacks router: pruned
    labels = list(table(text))
    assert len(set(labels)) == 3, labels


def test_a_data_mixture_is_labelled_by_its_shares():
    from trainer.analysis.compare import fmt_value

    mixture = [{"files": ["a/*.jsonl"], "weight": 3.0, "name": "books"}, {"files": ["b/"], "weight": 1.0, "name": ""}]
    assert fmt_value(mixture) == "books:0.75+source1:0.25"
    assert fmt_value([{"files": ["a"], "weight": None}, {"files": ["b"], "weight": None}]) == "source0:0.5+source1:0.5"
    assert fmt_value([1, 3]) == "[1, 3]"
