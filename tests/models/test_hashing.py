"""Tests for models/hashing.py: the fixed token -> expert tables of Hash Layers (Roller et al. 2021)."""

from __future__ import annotations

import pytest
import torch

from models.hashing import (
    UNIVERSAL_HASH_PRIME,
    _update_centroids,
    balanced_table,
    bigram_hash,
    clustered_table,
    dispersed_table,
    expert_mass,
    kmeans,
    random_table,
    token_counts,
    universal_hash_params,
)

P = UNIVERSAL_HASH_PRIME


def chi_square(values: torch.Tensor, num_bins: int) -> float:
    observed = torch.bincount(values.reshape(-1), minlength=num_bins).double()
    expected = values.numel() / num_bins
    return float(((observed - expected) ** 2 / expected).sum())


# With 15 degrees of freedom chi-square has mean 15 and std ~5.5; 50 is beyond the 1e-5 tail.
CHI2_BOUND_15_DOF = 50.0


def blobs(sizes: list[int], dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffled points from well-separated Gaussian blobs: centres ~ N(0, 10^2), noise std 0.05."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), dim, generator=g) * 10.0
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    points = centres[labels] + 0.05 * torch.randn(labels.numel(), dim, generator=g)
    perm = torch.randperm(labels.numel(), generator=g)
    return points[perm], labels[perm]


def assert_same_partition(pred: torch.Tensor, truth: torch.Tensor) -> None:
    # Each true group must map to one predicted label, and distinct groups to distinct labels.
    mapping = {}
    for t in truth.unique().tolist():
        labels = pred[truth == t].unique()
        assert labels.numel() == 1, f"blob {t} split over {labels.tolist()}"
        mapping[t] = int(labels)
    assert len(set(mapping.values())) == len(mapping)


# ---------------------------------------------------------------- random_table


def test_random_table_deterministic_in_range_and_seed_dependent():
    t = random_table(1000, 7, seed=3)
    assert t.dtype == torch.int64 and t.device.type == "cpu" and t.shape == (1000,)
    assert torch.equal(t, random_table(1000, 7, seed=3))
    assert not torch.equal(t, random_table(1000, 7, seed=4))
    assert int(t.min()) == 0 and int(t.max()) == 6


def test_random_table_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    random_table(100, 4, seed=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_table_roughly_uniform(seed):
    t = random_table(100_000, 16, seed=seed)
    assert chi_square(t, 16) < CHI2_BOUND_15_DOF


def test_random_table_validates():
    with pytest.raises(ValueError, match="num_keys"):
        random_table(0, 4, seed=0)
    with pytest.raises(ValueError, match="num_experts"):
        random_table(10, 0, seed=0)


# ---------------------------------------------------------------- balanced_table


def test_balanced_table_hand_computed_two_experts():
    # Greedy by count: 10->e0, 7->e1, 5->e1 (7<10), 3->e0 (10<12), 1->e1 (12<13), 1->e0 (13=13, lowest).
    counts = torch.tensor([10, 7, 5, 3, 1, 1])
    table = balanced_table(counts, 2)
    assert table.tolist() == [0, 1, 1, 0, 1, 0]
    assert expert_mass(table, counts, 2).tolist() == [14.0, 13.0]


def test_balanced_table_hand_computed_three_experts():
    # 10->e0, 7->e1, 5->e2, 3->e2 (5 lightest), 1->e1 (7<8), 1->e1 (masses 10, 8, 8: lowest index wins).
    counts = torch.tensor([10, 7, 5, 3, 1, 1])
    table = balanced_table(counts, 3)
    assert table.tolist() == [0, 1, 2, 2, 1, 1]
    assert expert_mass(table, counts, 3).tolist() == [10.0, 9.0, 8.0]


def test_balanced_table_zero_counts_round_robin():
    # Non-zero: 4->e0, 3->e1, 2->e1. Zero-count ids 0, 2, 3, 5 are dealt 0, 1, 0, 1.
    table = balanced_table(torch.tensor([0, 4, 0, 0, 2, 0, 3]), 2)
    assert table.tolist() == [0, 0, 1, 0, 1, 1, 1]
    all_zero = balanced_table(torch.zeros(10, dtype=torch.int64), 3)
    assert all_zero.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


def test_balanced_table_equal_counts_even_split():
    for vocab, experts in [(4, 3), (100, 7), (1000, 16), (5, 8)]:
        table = balanced_table(torch.full((vocab,), 5), experts)
        sizes = torch.bincount(table, minlength=experts)
        assert int(sizes.max() - sizes.min()) <= 1
    assert balanced_table(torch.full((4,), 5), 3).tolist() == [0, 1, 2, 0]


def zipf_counts(vocab: int, exponent: float, seed: int) -> torch.Tensor:
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    counts = torch.floor(1e7 / ranks**exponent).long()
    return counts[torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))]


def test_balanced_table_zipf_near_perfect_balance():
    # Exponent 0.8: the top token holds ~4% of the mass, under the 1/16 share of one expert, so a near
    # perfect split exists (with exponent 1.0 the top token alone is ~10% and max/mean >= 1.66 for any table).
    vocab, experts = 8192, 16
    counts = zipf_counts(vocab, 0.8, seed=0)
    table = balanced_table(counts, experts)
    assert table.dtype == torch.int64 and table.shape == (vocab,)
    mass = expert_mass(table, counts, experts)
    mean = float(counts.sum()) / experts
    assert float(mass.sum()) == float(counts.sum())
    assert float(mass.max()) <= mean + float(counts.max())  # LPT bound
    assert float(mass.max()) / mean <= 1.01  # stated tolerance: 1% over the mean
    assert bool((torch.bincount(table, minlength=experts) > 0).all())
    assert torch.equal(table, balanced_table(counts, experts))


def test_balanced_table_heavy_head_is_isolated():
    # Exponent 1.1: the top token outweighs an expert's fair share; greedy leaves it alone on its expert,
    # which is optimal (max mass == max count), and the bound still holds.
    counts = zipf_counts(8192, 1.1, seed=1)
    table = balanced_table(counts, 16)
    mass = expert_mass(table, counts, 16)
    top_expert = int(table[int(counts.argmax())])
    assert int((table == top_expert).sum()) == 1
    assert float(mass.max()) == float(counts.max())


def test_balanced_table_random_order_is_seeded_balanced_and_not_frequency_banded():
    vocab, experts = 8192, 16
    counts = zipf_counts(vocab, 0.8, seed=0)
    table = balanced_table(counts, experts, seed=3)
    assert torch.equal(table, balanced_table(counts, experts, seed=3))
    assert not torch.equal(table, balanced_table(counts, experts, seed=4))
    mass = expert_mass(table, counts, experts)
    mean = float(counts.sum()) / experts
    assert float(mass.sum()) == float(counts.sum())
    assert float(mass.max()) <= mean + float(counts.max())  # the greedy bound holds for any order
    assert float(mass.max()) / mean <= 1.05
    # LPT deals the rare half out in frequency order; the random order is another partition of it.
    rank_V = torch.argsort(torch.argsort(counts, descending=True))
    rare = rank_V >= vocab // 2
    lpt = balanced_table(counts, experts)
    assert float((lpt[rare] == table[rare]).float().mean()) < 0.2  # about 1/16 by chance


def test_balanced_table_random_order_equal_counts_even_split():
    for vocab, experts in [(4, 3), (100, 7), (1000, 16)]:
        table = balanced_table(torch.full((vocab,), 5), experts, seed=0)
        sizes = torch.bincount(table, minlength=experts)
        assert int(sizes.max() - sizes.min()) <= 1
    # zero counts: round-robin in the random order, so still an even split
    table = balanced_table(torch.zeros(10, dtype=torch.int64), 3, seed=1)
    assert sorted(torch.bincount(table, minlength=3).tolist()) == [3, 3, 4]


def test_balanced_table_float_counts():
    table = balanced_table(torch.tensor([0.5, 2.5, 1.0, 1.0]), 2)
    assert table.tolist() == [1, 0, 1, 1]


def test_balanced_table_validates():
    with pytest.raises(ValueError, match="num_experts"):
        balanced_table(torch.ones(4), 0)
    with pytest.raises(ValueError, match="non-negative"):
        balanced_table(torch.tensor([1, -1, 2]), 2)
    with pytest.raises(ValueError, match="1-D"):
        balanced_table(torch.ones(2, 2), 2)


# ---------------------------------------------------------------- expert_mass, token_counts


def test_expert_mass_exact():
    mass = expert_mass(torch.tensor([2, 0, 2, 2]), torch.tensor([3, 4, 5, 6]), 4)
    assert mass.dtype == torch.float64
    assert mass.tolist() == [4.0, 0.0, 14.0, 0.0]
    with pytest.raises(ValueError, match="table values"):
        expert_mass(torch.tensor([0, 4]), torch.tensor([1, 1]), 4)
    with pytest.raises(ValueError, match="shape"):
        expert_mass(torch.tensor([0, 1, 1]), torch.tensor([1, 1]), 4)


def test_token_counts_exact():
    batches = [torch.tensor([[1, 2], [2, 3]]), torch.tensor([3, 3, 0]), torch.tensor([], dtype=torch.long)]
    counts = token_counts(batches, 5)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [1, 1, 2, 3, 0]
    assert token_counts(iter(batches), 5).tolist() == [1, 1, 2, 3, 0]
    assert token_counts(torch.tensor([[4, 4], [0, 4]], dtype=torch.int32), 5).tolist() == [1, 0, 0, 0, 3]


def test_token_counts_rejects_bad_ids():
    with pytest.raises(ValueError, match="token id 5 "):
        token_counts([torch.tensor([0, 1]), torch.tensor([2, 5, 7])], 5)
    with pytest.raises(ValueError, match="token id -1 "):
        token_counts(torch.tensor([3, -1]), 5)
    with pytest.raises(ValueError, match="integer"):
        token_counts(torch.tensor([1.0]), 5)
    with pytest.raises(ValueError, match="vocab_size"):
        token_counts(torch.tensor([0]), 0)


# ---------------------------------------------------------------- kmeans, clustered_table


def test_kmeans_small_exact():
    points = torch.tensor([[0.0], [10.0], [1.0], [11.0], [2.0], [12.0]])
    assign, centroids = kmeans(points, 2, seed=0)
    assert assign.dtype == torch.int64
    assert assign[0] == assign[2] == assign[4] and assign[1] == assign[3] == assign[5] != assign[0]
    assert centroids.dtype == torch.float32 and centroids.shape == (2, 1)
    assert centroids[assign[0], 0] == 1.0 and centroids[assign[1], 0] == 11.0


def test_kmeans_recovers_blobs_deterministically():
    points, truth = blobs([20, 35, 50, 25, 40, 30], dim=16, seed=0)
    for seed in range(3):
        assign, centroids = kmeans(points, 6, seed=seed)
        assert_same_partition(assign, truth)
        again = kmeans(points, 6, seed=seed)
        assert torch.equal(assign, again[0]) and torch.equal(centroids, again[1])


def test_kmeans_k_equals_n_gives_singletons():
    points = torch.randn(9, 3, generator=torch.Generator().manual_seed(0))
    assign, _ = kmeans(points, 9, seed=5)
    assert sorted(assign.tolist()) == list(range(9))


def test_kmeans_duplicate_points_stay_valid():
    # Three distinct points, five clusters: some clusters must stay empty; results stay in range.
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]).repeat(4, 1)
    assign, centroids = kmeans(points, 5, seed=0)
    assert int(assign.min()) >= 0 and int(assign.max()) < 5 and centroids.shape == (5, 2)
    assert torch.equal(assign, kmeans(points, 5, seed=0)[0])
    assert_same_partition(assign, torch.tensor([0, 1, 2]).repeat(4))


def test_update_centroids_reseeds_empty_cluster_at_farthest_point():
    points = torch.tensor([[0.0], [1.0], [10.0]])
    new = _update_centroids(points, torch.tensor([0, 0, 0]), torch.tensor([[0.0], [100.0], [50.0]]))
    assert new[:, 0].tolist() == pytest.approx([11.0 / 3.0, 10.0, 1.0])


def test_kmeans_validates():
    with pytest.raises(ValueError, match="points_ND"):
        kmeans(torch.zeros(5), 2, seed=0)
    with pytest.raises(ValueError, match="fewer than k"):
        kmeans(torch.zeros(3, 2), 4, seed=0)
    with pytest.raises(ValueError, match="iters"):
        kmeans(torch.zeros(3, 2), 2, seed=0, iters=-1)


def test_clustered_table_recovers_blobs():
    embeddings, truth = blobs([40, 10, 25, 60, 15, 30, 20, 50], dim=32, seed=1)
    table = clustered_table(embeddings.double(), 8, seed=0)
    assert table.dtype == torch.int64 and table.shape == (truth.numel(),)
    assert_same_partition(table, truth)
    assert torch.equal(table, clustered_table(embeddings, 8, seed=0))
    with pytest.raises(ValueError, match="num_experts"):
        clustered_table(embeddings[:5], 8, seed=0)
    with pytest.raises(ValueError, match="embeddings_VD"):
        clustered_table(embeddings[0], 8, seed=0)


# ---------------------------------------------------------------- dispersed_table


def test_dispersed_table_separates_similar_tokens():
    experts = 8
    sizes = [3, 8, 5, 8, 1, 6, 7, 2]  # all <= E, 40 tokens in total
    embeddings, truth = blobs(sizes, dim=16, seed=2)
    table = dispersed_table(embeddings, experts, seed=0)
    assert table.dtype == torch.int64 and int(table.min()) >= 0 and int(table.max()) < experts
    for blob in range(len(sizes)):
        members = table[truth == blob]
        assert members.unique().numel() == members.numel(), f"blob {blob} reuses an expert"
    assert torch.bincount(table, minlength=experts).tolist() == [5] * experts
    assert torch.equal(table, dispersed_table(embeddings, experts, seed=0))


def test_dispersed_table_large_clusters_even_and_spread():
    experts = 4
    sizes = [30, 11, 17, 9]
    embeddings, truth = blobs(sizes, dim=8, seed=3)
    table = dispersed_table(embeddings, experts, seed=1)
    usage = torch.bincount(table, minlength=experts)
    assert int(usage.max() - usage.min()) <= 1
    for blob, n in enumerate(sizes):
        per_expert = torch.bincount(table[truth == blob], minlength=experts)
        assert int(per_expert.max()) - int(per_expert.min()) <= 1, f"blob of {n} unevenly spread"


# ---------------------------------------------------------------- universal / bigram hash


def test_universal_hash_params_deterministic_and_in_range():
    params = universal_hash_params(64, seed=0)
    assert params.dtype == torch.int64 and params.shape == (64, 3)
    assert torch.equal(params, universal_hash_params(64, seed=0))
    assert not torch.equal(params, universal_hash_params(64, seed=1))
    a, b, c = params.unbind(1)
    assert bool(((a >= 1) & (a < P) & (b >= 1) & (b < P) & (c >= 0) & (c < P)).all())
    assert P == 2**30 - 35
    with pytest.raises(ValueError, match="num_heads"):
        universal_hash_params(0, seed=0)


def random_ids(n: int, seed: int, high: int = 50_000) -> torch.Tensor:
    return torch.randint(high, (n,), generator=torch.Generator().manual_seed(seed))


def test_bigram_hash_matches_formula_and_range():
    params = universal_hash_params(1, seed=7)[0]
    prev, cur = random_ids(1000, 0), random_ids(1000, 1)
    out = bigram_hash(prev, cur, params, 16)
    assert out.dtype == torch.int64 and out.shape == (1000,)
    assert int(out.min()) >= 0 and int(out.max()) < 16
    a, b, c = params.tolist()
    expected = [((a * p + b * q + c) % P) % 16 for p, q in zip(prev.tolist(), cur.tolist())]
    assert out.tolist() == expected
    assert torch.equal(out, bigram_hash(prev, cur, params, 16))


def test_bigram_hash_depends_on_both_tokens():
    params = universal_hash_params(1, seed=0)[0]
    prev, cur = random_ids(20_000, 0), random_ids(20_000, 1)
    base = bigram_hash(prev, cur, params, 16)
    other = random_ids(20_000, 2)
    changed_prev = (bigram_hash(other, cur, params, 16) != base)[other != prev].double().mean()
    changed_cur = (bigram_hash(prev, other, params, 16) != base)[other != cur].double().mean()
    # Expected 15/16 = 0.9375 for an ideal hash.
    assert float(changed_prev) > 0.9 and float(changed_cur) > 0.9


def test_bigram_hash_roughly_uniform_per_head():
    params = universal_hash_params(4, seed=3)
    prev, cur = random_ids(200_000, 0), random_ids(200_000, 1)
    out = bigram_hash(prev, cur, params, 16)
    assert out.shape == (200_000, 4)
    for h in range(4):
        assert chi_square(out[:, h], 16) < CHI2_BOUND_15_DOF
    assert float((out[:, 0] == out[:, 1]).double().mean()) < 0.1  # heads are independent-ish


def test_bigram_hash_no_overflow_near_prime():
    ids = torch.arange(P - 1000, P)
    params = torch.tensor([[P - 1, P - 1, P - 1], [P - 2, 1, 0]])
    out = bigram_hash(ids, ids.flip(0), params, 1000)
    for h, (a, b, c) in enumerate(params.tolist()):
        expected = [((a * p + b * q + c) % P) % 1000 for p, q in zip(ids.tolist(), ids.flip(0).tolist())]
        assert out[:, h].tolist() == expected
    assert int(out.min()) >= 0


def test_bigram_hash_broadcast():
    params = universal_hash_params(3, seed=0)
    out = bigram_hash(torch.zeros(2, 1, dtype=torch.long), torch.arange(5), params[0], 8)
    assert out.shape == (2, 5)
    prev, cur = torch.zeros(2, 7, dtype=torch.long), torch.ones(7, dtype=torch.long)
    assert bigram_hash(prev, cur, params, 8).shape == (2, 7, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bigram_hash_on_cuda_matches_cpu():
    params = universal_hash_params(2, seed=0)  # stays on CPU: bigram_hash moves it to the ids' device
    prev, cur = random_ids(4096, 0), random_ids(4096, 1)
    out = bigram_hash(prev.cuda(), cur.cuda(), params, 16)
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), bigram_hash(prev, cur, params, 16))


def test_bigram_hash_validates():
    params = universal_hash_params(1, seed=0)[0]
    with pytest.raises(ValueError, match="cur_ids"):
        bigram_hash(torch.tensor([1]), torch.tensor([P]), params, 4)
    with pytest.raises(ValueError, match="prev_ids"):
        bigram_hash(torch.tensor([-1]), torch.tensor([1]), params, 4)
    with pytest.raises(ValueError, match="params_3"):
        bigram_hash(torch.tensor([1]), torch.tensor([1]), torch.tensor([1, 2]), 4)
    with pytest.raises(ValueError, match="num_experts"):
        bigram_hash(torch.tensor([1]), torch.tensor([1]), params, 0)
