"""Dropless expert-parallel dispatch: equal to DeepSpeed's stock path when nothing is dropped, and in training."""

import json

import pytest
import torch

from tests.trainer.harness import (
    base_config,
    check,
    run,
    torchrun,
    train_command,
    train_rows,
    write_config,
)
from trainer.dropless import source_to_slot_order

pytestmark = pytest.mark.slow  # multi-process


def test_source_to_slot_order_regroups_rows_by_local_slot():
    # rows arrive as (rank 0: slot0 x2, slot1 x1), (rank 1: slot0 x1, slot1 x3)
    counts = torch.tensor([[2, 1], [1, 3]])
    assert source_to_slot_order(counts).tolist() == [0, 1, 3, 2, 4, 5, 6]
    assert source_to_slot_order(counts, 7).tolist() == [0, 1, 3, 2, 4, 5, 6]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):  # empty pieces, empty ranks, nothing at all: against the piece-by-piece definition
        counts = torch.randint(0, 4, (3, 4), generator=generator) * torch.randint(0, 2, (3, 1), generator=generator)
        start = (torch.cumsum(counts.flatten(), 0) - counts.flatten()).view(3, 4)
        naive = [i for s in range(4) for p in range(3) for i in range(start[p, s], start[p, s] + counts[p, s])]
        assert source_to_slot_order(counts, int(counts.sum())).tolist() == naive


def test_dropless_equals_stock_outputs_and_gradients_on_two_ranks(tmp_path):
    check(run(torchrun(2, ["tests/trainer/dispatch_worker.py", str(tmp_path)])))
    idle = []
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank_{rank}.json").read_text())
        idle += results["skewed"]["experts_without_tokens"]
        assert set(results) == {"hash", "hash-multi", "topk", "switch", "skewed", "one-rank"}
        for case, r in results.items():
            assert r["logits_max_abs_diff"] < 1e-6, (rank, case, r)
            assert r["grad_max_abs_diff"] < 1e-6 * max(1.0, r["grad_max_abs"]), (rank, case, r)
            assert r["num_grads"] > 10
    assert idle, "the skewed case must leave some expert without tokens (zero-token slots must not hang)"
    # "one-rank" (rank 1 receives no rows at all) checks that such a rank still takes part in every backward
    # all-to-all: before the fix in run_local_experts, gloo aborted with a collective size mismatch.


def test_dropless_training_matches_stock_and_drops_nothing(corpus, tmp_path):
    corpus_file, cache = corpus
    common = dict(parallel__ep_size=2, optim__micro_batch_size=2, optim__max_steps=5, model__router="topk",
                  model__capacity_factor=None)
    stock = base_config(tmp_path / "stock", corpus_file, cache, **common)
    dropless = base_config(tmp_path / "dropless", corpus_file, cache, parallel__dispatch="dropless", **common)
    check(run(train_command(write_config(tmp_path / "stock.yaml", stock), 2)))
    check(run(train_command(write_config(tmp_path / "dropless.yaml", dropless), 2)))
    rows_s, rows_d = train_rows(tmp_path / "stock"), train_rows(tmp_path / "dropless")
    for step in range(1, 6):
        assert rows_d[step]["train/loss"] == pytest.approx(rows_s[step]["train/loss"], rel=1e-6)
        assert rows_d[step]["moe/dropped_frac"] == 0.0
        assert 0.0 < rows_d[step]["time/all_to_all_frac"] < 1.0
    # checkpoints are interchangeable: the stock run resumes from the dropless run's checkpoint
    files_s = sorted(p.name for p in (tmp_path / "stock" / "checkpoints" / "step_5").iterdir())
    files_d = sorted(p.name for p in (tmp_path / "dropless" / "checkpoints" / "step_5").iterdir())
    assert files_s == files_d
    dropless["parallel"]["dispatch"] = "stock"
    dropless["optim"]["max_steps"] = 6
    check(run(train_command(write_config(tmp_path / "dropless.yaml", dropless), 2, "--allow-config-change")))
    assert sorted(train_rows(tmp_path / "dropless")) == list(range(1, 7))
