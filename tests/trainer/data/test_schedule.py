"""Tests for trainer/data/schedule.py: the shuffled order is a bijection, batches are a pure function of the
step (any call order, any world size with the same global batch), validation shares partition the blocks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trainer.data.prepare import Blocks
from trainer.data.schedule import BatchSchedule, MixtureSchedule, ShuffledOrder, valid_shard
from trainer.errors import UserError


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 1000, 4097])
def test_shuffled_order_is_a_permutation(n):
    order = ShuffledOrder(n, key=11)(np.arange(n))
    assert sorted(order.tolist()) == list(range(n))
    if n >= 16:
        assert order.tolist() != list(range(n)) and not np.array_equal(order, ShuffledOrder(n, key=12)(np.arange(n)))


def test_shuffled_order_of_a_large_corpus_costs_only_the_positions_asked_for():
    n = 80_000_000_000  # 10T tokens in 128-token blocks: no array of this length is ever made
    order = ShuffledOrder(n, key=3)
    picked = order(np.arange(1_000_000, 1_000_064))
    assert picked.min() >= 0 and picked.max() < n and len(set(picked.tolist())) == 64
    assert np.array_equal(order(np.array([1_000_010])), picked[10:11])


def test_batch_schedule_is_deterministic():
    a, b = BatchSchedule(50, 4, 0, 1, seed=7), BatchSchedule(50, 4, 0, 1, seed=7)
    steps = range(40)
    assert all(torch.equal(a.indices(s), b.indices(s)) for s in steps)
    other = BatchSchedule(50, 4, 0, 1, seed=8)
    assert any(not torch.equal(a.indices(s), other.indices(s)) for s in steps)
    blocks = torch.arange(50 * 3).reshape(50, 3)
    assert torch.equal(a.batch(blocks, 5), blocks[a.indices(5)]) and a.indices(5).shape == (4,)
    stream = Blocks(np.arange(50 * 3, dtype=np.uint16), 3)  # the same from a stored stream
    assert torch.equal(a.batch(stream, 5), blocks[a.indices(5)])


@pytest.mark.parametrize("num_blocks", [24, 37])
def test_one_rank_with_double_micro_batch_equals_two_ranks(num_blocks):
    single = BatchSchedule(num_blocks, 6, 0, 1, seed=3)
    ranks = [BatchSchedule(num_blocks, 3, r, 2, seed=3) for r in range(2)]
    for step in range(30):  # several epochs
        assert torch.equal(single.indices(step), torch.cat([r.indices(step) for r in ranks]))


@pytest.mark.parametrize("num_blocks", [24, 26])
def test_each_epoch_visits_blocks_at_most_once(num_blocks):
    ranks = [BatchSchedule(num_blocks, 2, r, 3, seed=0) for r in range(3)]
    per_epoch = ranks[0].steps_per_epoch
    assert per_epoch == num_blocks // 6
    epochs = []
    for epoch in range(3):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        seen = torch.cat([r.indices(s) for s in steps for r in ranks])
        assert seen.unique().numel() == seen.numel() == per_epoch * 6
        assert torch.equal(seen, ranks[0].permutation(epoch)[: per_epoch * 6])
        epochs.append(seen)
        if num_blocks % 6 == 0:
            assert sorted(seen.tolist()) == list(range(num_blocks))
    assert not torch.equal(epochs[0], epochs[1])  # a fresh order every epoch


def test_indices_do_not_depend_on_call_history():
    steps = list(range(60))
    reference = BatchSchedule(20, 2, 1, 2, seed=5)
    expected = {s: reference.indices(s) for s in steps}
    resumed = BatchSchedule(20, 2, 1, 2, seed=5)
    random.Random(0).shuffle(steps)
    assert all(torch.equal(resumed.indices(s), expected[s]) for s in steps)


def test_global_batch_larger_than_the_data_is_a_user_error():
    with pytest.raises(UserError) as e:
        BatchSchedule(10, 3, 0, 4, seed=0)
    assert e.value.key == "optim.micro_batch_size"


@pytest.mark.parametrize("num_valid", [0, 1, 5, 7, 8])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("count", [None, 3])
def test_valid_shards_partition_the_blocks(num_valid, world_size, count):
    blocks = torch.arange(num_valid * 4).reshape(num_valid, 4)
    stream = Blocks(np.arange(num_valid * 4 + 3, dtype=np.uint32), 4)  # a partial last block is dropped
    first = blocks[:count]
    for source in (blocks, stream):
        shards = [valid_shard(source, r, world_size, count) for r in range(world_size)]
        assert torch.equal(torch.cat(shards), first)
        assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1
        assert torch.equal(torch.cat(shards), torch.cat(torch.tensor_split(first, world_size)))


# ---------------------------------------------------------------- mixtures

def test_a_mixture_draws_each_source_by_its_weight_exactly_per_period():
    mixture = MixtureSchedule([100, 7, 50], [5.0, 3.0, 2.0], 8, 0, 1, seed=1)
    assert mixture.period == 10 and mixture.quanta.tolist() == [5, 3, 2]
    source, draw = mixture.draws(np.arange(10 * 37))
    assert np.bincount(source).tolist() == [5 * 37, 3 * 37, 2 * 37]
    for s in range(3):  # a source's draws are numbered in order, without gaps
        assert draw[source == s].tolist() == list(range((source == s).sum()))
    assert mixture.drawn(10 * 37).tolist() == [5 * 37, 3 * 37, 2 * 37]
    assert mixture.drawn(13).tolist() == np.bincount(mixture.draws(np.arange(13))[0], minlength=3).tolist()


def test_mixture_shares_stay_within_one_percent_for_awkward_weights():
    weights = [0.6137, 0.2871, 0.0992]
    mixture = MixtureSchedule([1000, 1000, 1000], weights, 16, 0, 1, seed=0)
    for slots in (2_000, 10_000, 123_457):
        shares = mixture.drawn(slots) / slots
        assert np.all(np.abs(shares / np.array(weights) - 1) < 0.01), (slots, shares)


def test_a_mixture_step_is_the_same_for_any_world_size_and_call_order():
    single = MixtureSchedule([30, 11], [0.7, 0.3], 6, 0, 1, seed=3)
    ranks = [MixtureSchedule([30, 11], [0.7, 0.3], 3, r, 2, seed=3) for r in range(2)]
    steps = list(range(40))
    expected = {s: single.indices(s) for s in steps}
    random.Random(0).shuffle(steps)
    for step in steps:
        assert torch.equal(expected[step], torch.cat([r.indices(step) for r in ranks]))


def test_a_source_that_runs_out_starts_a_fresh_order():
    mixture = MixtureSchedule([12, 5], [0.5, 0.5], 2, 0, 1, seed=4)
    ids = torch.cat([mixture.indices(s) for s in range(30)]).numpy()
    small = ids[ids >= 12] - 12  # the 5-block source, drawn 30 times: 6 epochs
    epochs = small.reshape(6, 5)
    assert all(sorted(e.tolist()) == list(range(5)) for e in epochs)
    assert len({tuple(e.tolist()) for e in epochs}) > 1  # each epoch its own order
    assert mixture.epochs(5).tolist() == [0, 1] and mixture.epochs(30).tolist() == [2, 6]
