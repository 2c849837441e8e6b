"""A mixture trained by the real `hashmoe train`: each source's share of the blocks drawn, the message when a
source runs out, and a resume mid-epoch that continues the same draws (losses equal bit for bit, CPU)."""

from __future__ import annotations

import json

import pytest

from tests.trainer.harness import (
    base_config,
    check,
    run,
    train_command,
    train_rows,
    write_config,
    write_corpus,
)

pytestmark = pytest.mark.slow  # training runs in subprocesses


def mixture_config(tmp_path, run_name: str, **overrides) -> dict:
    big = tmp_path / "big" / "corpus.jsonl"
    # a constant lr: a run cut at step 6 (max_steps 6) then resumed to 12 trains like one run of 12
    settings = dict(optim__max_steps=12, optim__schedule="constant", checkpoint__every=6, logging__eval_every=6)
    settings |= overrides
    config = base_config(tmp_path / run_name, big, tmp_path / "cache", **settings)
    config["data"]["train_files"] = []
    config["data"]["sources"] = [{"files": [str(big)], "weight": 0.75, "name": "big"},
                                 {"files": [str(tmp_path / "small" / "corpus.jsonl")], "weight": 0.25, "name": "small"}]
    return config


def test_a_mixture_trains_resumes_and_says_when_a_source_runs_out(tmp_path):
    (tmp_path / "big").mkdir()
    (tmp_path / "small").mkdir()
    write_corpus(tmp_path / "big", docs=60, seed=1)
    write_corpus(tmp_path / "small", docs=2, seed=2)  # one training document: a few blocks
    straight = write_config(tmp_path / "straight.yaml", mixture_config(tmp_path, "straight"))
    result = check(run(train_command(straight, 1)))
    assert "hashmoe: data source small ran out at step" in result.stdout
    rows = train_rows(tmp_path / "straight")
    store = json.loads(next((tmp_path / "cache").glob("*/manifest.json")).read_text())
    small_blocks = store["corpora"][1]["train_tokens"] // 32
    # 12 steps x 4 blocks, a quarter from the small source
    assert rows[12]["data/epochs/small"] == pytest.approx(12 * 4 * 0.25 / small_blocks)
    assert rows[12]["data/epochs/small"] > 1 > rows[12]["data/epochs/big"]
    assert "sources" in (tmp_path / "straight" / "config.yaml").read_text()

    cut = write_config(tmp_path / "cut.yaml", mixture_config(tmp_path, "cut", optim__max_steps=6))
    check(run(train_command(cut, 1)))
    cut = write_config(tmp_path / "cut.yaml", mixture_config(tmp_path, "cut"))
    check(run(train_command(cut, 1, "--allow-config-change")))  # max_steps 6 -> 12, recorded
    resumed = train_rows(tmp_path / "cut")
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step]["train/loss"] == rows[step]["train/loss"], step
