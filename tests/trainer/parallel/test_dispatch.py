"""The dispatcher over an expert-parallel group of 2 ranks: equal to the same model in one process."""

import json

import pytest
import torch

from tests.trainer.harness import check, run, torchrun
from trainer.parallel.expert_exchange import source_to_slot_order

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


def test_expert_parallel_dispatch_equals_one_process_outputs_and_gradients(tmp_path):
    check(run(torchrun(2, ["tests/trainer/dispatch_worker.py", str(tmp_path)])))
    idle, dropped = 0, 0
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank_{rank}.json").read_text())
        assert len(results) == 18  # 9 cases x (grouped_mm, eager)
        idle += results["skewed/grouped_mm"]["expert_slices_without_rows"]
        dropped += results["switch-capacity/grouped_mm"]["dropped"]
        for case, r in results.items():
            assert r["logits_max_abs_diff"] < 1e-5, (rank, case, r)
            assert r["grad_max_abs_diff"] < 1e-5 * max(1.0, r["grad_max_abs"]), (rank, case, r)
            assert r["num_grads"] > 10
        # 2 layers x (w1, w2) x 2 local experts
        assert results["one-rank/eager"]["expert_slices_without_rows"] == (8 if rank == 1 else 0)
    assert idle, "the skewed case must leave some expert without tokens (zero-token slots must not hang)"
    assert dropped, "the capacity case must drop routes (they must leave before the exchange)"
    # "one-rank" (rank 1 receives no rows at all) checks that such a rank still takes part in every backward
    # all-to-all: an empty rank that left the autograd graph once made gloo abort with a size mismatch.
