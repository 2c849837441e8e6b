"""Tests for models/assignment.py: the auction-algorithm balanced assignment of BASE layers (Lewis et al. 2021)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.assignment import DEFAULT_REL_EPS, balanced_assignment, default_capacities

linear_sum_assignment = pytest.importorskip("scipy.optimize").linear_sum_assignment


def random_scores(T: int, E: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def objective(scores_TE: torch.Tensor, expert_T: torch.Tensor) -> float:
    return float(scores_TE.double()[torch.arange(scores_TE.shape[0]), expert_T].sum())


def optimum(scores_TE: torch.Tensor, capacity_E: torch.Tensor) -> float:
    """Exact optimum: Hungarian algorithm on the expanded problem, expert e repeated capacity_E[e] times."""
    columns = np.repeat(np.arange(scores_TE.shape[1]), capacity_E.numpy())
    expanded = scores_TE.double().numpy()[:, columns]
    rows, cols = linear_sum_assignment(expanded, maximize=True)
    return float(expanded[rows, cols].sum())


def spread(scores_TE: torch.Tensor) -> float:
    scores_TE = scores_TE.double()
    return float((scores_TE.amax(dim=1) - scores_TE.amin(dim=1)).max())


def assert_balanced(expert_T: torch.Tensor, capacity_E: torch.Tensor) -> None:
    assert expert_T.dtype == torch.int64
    assert expert_T.shape == (int(capacity_E.sum()),)
    assert torch.equal(torch.bincount(expert_T, minlength=len(capacity_E)), capacity_E)


def assert_near_optimal(
    scores_TE: torch.Tensor, capacity_E: torch.Tensor, expert_T: torch.Tensor, eps: float
):
    T = scores_TE.shape[0]
    best = optimum(scores_TE, capacity_E)
    got = objective(scores_TE, expert_T)
    slack = 1e-5 * T * spread(scores_TE)  # float32 rounding of scores and prices
    assert got <= best + slack
    assert got >= best - T * eps - slack, (got, best, T * eps)


# -- default_capacities ----------------------------------------------------------------------------------


@pytest.mark.parametrize("T,E", [(0, 1), (0, 5), (1, 1), (3, 8), (16, 4), (17, 4), (1000, 7)])
def test_default_capacities_split_evenly(T, E):
    capacity_E = default_capacities(T, E)
    assert capacity_E.dtype == torch.int64 and capacity_E.shape == (E,)
    assert int(capacity_E.sum()) == T
    assert int(capacity_E.max() - capacity_E.min()) <= 1
    assert torch.equal(capacity_E, capacity_E.sort(descending=True).values)  # extra tokens go to the first


@pytest.mark.parametrize("T,E", [(-1, 2), (4, 0), (4.0, 2), (4, 2.0)])
def test_default_capacities_rejects_bad_sizes(T, E):
    with pytest.raises(ValueError, match="num_tokens|num_experts"):
        default_capacities(T, E)


# -- balance ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "T,E", [(0, 1), (0, 4), (1, 1), (5, 1), (1, 3), (3, 8), (7, 2), (10, 3), (100, 7), (257, 16), (1000, 13)]
)
def test_default_capacities_are_met_exactly(T, E):
    expert_T = balanced_assignment(random_scores(T, E, seed=T * 31 + E))
    assert_balanced(expert_T, default_capacities(T, E))


@pytest.mark.parametrize(
    "capacity",
    [[5, 0, 3, 2], [0, 0, 10, 0], [1, 9, 0, 0], [9, 1, 0, 0], [0, 1, 1, 8], [3, 3, 2, 2]],
)
def test_custom_capacities_are_met_exactly(capacity):
    capacity_E = torch.tensor(capacity)
    scores_TE = random_scores(10, 4, seed=sum(capacity))
    expert_T = balanced_assignment(scores_TE, capacity_E)
    assert_balanced(expert_T, capacity_E)
    assert_near_optimal(scores_TE, capacity_E, expert_T, DEFAULT_REL_EPS * spread(scores_TE))


def test_capacity_given_as_list_or_int32_tensor():
    scores_TE = random_scores(6, 3, seed=0)
    expected = balanced_assignment(scores_TE, torch.tensor([1, 2, 3]))
    assert torch.equal(balanced_assignment(scores_TE, [1, 2, 3]), expected)
    assert torch.equal(balanced_assignment(scores_TE, torch.tensor([1, 2, 3], dtype=torch.int32)), expected)


# -- optimality against the Hungarian algorithm ----------------------------------------------------------


@pytest.mark.parametrize("E", [2, 4, 8, 16])
@pytest.mark.parametrize("T", [16, 100, 256])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_eps_is_within_bound_of_optimum(T, E, seed):
    scores_TE = random_scores(T, E, seed)
    expert_T = balanced_assignment(scores_TE)
    assert_balanced(expert_T, default_capacities(T, E))
    assert_near_optimal(scores_TE, default_capacities(T, E), expert_T, DEFAULT_REL_EPS * spread(scores_TE))


@pytest.mark.parametrize("E", [2, 4, 8, 16])
@pytest.mark.parametrize("rel_eps", [0.3, 1e-3, 1e-6])
@pytest.mark.parametrize("seed", [0, 1])
def test_explicit_eps_is_within_bound_of_optimum(E, rel_eps, seed):
    scores_TE = random_scores(200, E, seed + 10)
    eps = rel_eps * spread(scores_TE)  # 1e-6 is below float32 resolution: exercises the float64 path
    expert_T = balanced_assignment(scores_TE, eps=eps)
    assert_near_optimal(scores_TE, default_capacities(200, E), expert_T, eps)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_custom_capacities_are_near_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    capacity_E = torch.multinomial(torch.ones(6), 120, replacement=True, generator=g).bincount(minlength=6)
    scores_TE = random_scores(120, 6, seed + 20) * torch.rand(6, generator=g) * 5  # uneven expert scales
    expert_T = balanced_assignment(scores_TE, capacity_E, eps=1e-3)
    assert_balanced(expert_T, capacity_E)
    assert_near_optimal(scores_TE, capacity_E, expert_T, 1e-3)


@pytest.mark.parametrize("T,E,seed", [(64, 4, 0), (150, 8, 1), (256, 16, 2), (99, 2, 3)])
def test_integer_scores_with_eps_below_one_over_T_are_exactly_optimal(T, E, seed):
    scores_TE = torch.randint(0, 20, (T, E), generator=torch.Generator().manual_seed(seed))
    expert_T = balanced_assignment(scores_TE, eps=0.99 / T)
    assert objective(scores_TE, expert_T) == optimum(scores_TE, default_capacities(T, E))


def test_scale_and_offset_do_not_change_the_answer():
    scores_TE = random_scores(128, 8, seed=5, dtype=torch.float64)
    expert_T = balanced_assignment(scores_TE)
    shifted_T = balanced_assignment(
        scores_TE * 1000.0 + 1e6 + torch.arange(128.0, dtype=torch.float64)[:, None]
    )
    assert torch.equal(expert_T, shifted_T)  # eps follows the spread; per-token offsets are irrelevant


# -- ties and degenerate inputs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["all_equal", "one_expert_preferred", "duplicate_rows", "identical_columns", "two_values", "huge_offset"],
)
def test_degenerate_inputs_terminate_balanced_and_near_optimal(name):
    T, E = 96, 6
    base = random_scores(T, E, seed=7)
    scores_TE = {
        "all_equal": torch.full((T, E), 3.5),
        "one_expert_preferred": torch.zeros(T, E).index_fill_(1, torch.tensor([2]), 1.0),
        "duplicate_rows": base[:4].repeat(T // 4, 1),
        "identical_columns": base[:, :1].expand(T, E).contiguous(),
        "two_values": (base > 0).float(),
        "huge_offset": base + 1e4,
    }[name]
    expert_T = balanced_assignment(scores_TE)
    assert_balanced(expert_T, default_capacities(T, E))
    assert_near_optimal(scores_TE, default_capacities(T, E), expert_T, DEFAULT_REL_EPS * spread(scores_TE))


def test_all_tokens_preferring_one_expert_fill_it_with_their_strongest():
    strength_T = torch.linspace(0.1, 1.0, 40)
    scores_TE = torch.zeros(40, 4)
    scores_TE[:, 0] = strength_T
    expert_T = balanced_assignment(scores_TE, eps=1e-4)
    assert set(torch.nonzero(expert_T == 0).squeeze(1).tolist()) == set(range(30, 40))


def test_single_expert_and_single_live_expert():
    assert torch.equal(balanced_assignment(random_scores(9, 1, 0)), torch.zeros(9, dtype=torch.int64))
    assert torch.equal(
        balanced_assignment(random_scores(9, 3, 0), [0, 9, 0]), torch.ones(9, dtype=torch.int64)
    )


def test_empty_input():
    expert_T = balanced_assignment(torch.empty(0, 4))
    assert expert_T.dtype == torch.int64 and expert_T.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_other_score_dtypes(dtype):
    scores_TE = (random_scores(64, 4, seed=3) * 10).to(dtype)
    expert_T = balanced_assignment(scores_TE)
    assert_balanced(expert_T, default_capacities(64, 4))
    assert_near_optimal(
        scores_TE.double(), default_capacities(64, 4), expert_T, DEFAULT_REL_EPS * spread(scores_TE)
    )


def test_runs_under_autograd_without_building_a_graph():
    scores_TE = random_scores(32, 4, seed=1).requires_grad_()
    expert_T = balanced_assignment(scores_TE)
    assert not expert_T.requires_grad and expert_T.grad_fn is None


# -- determinism and device ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores_TE", [random_scores(500, 8, seed=9), torch.ones(50, 5), torch.eye(5).repeat(10, 1)]
)
def test_same_input_gives_same_output(scores_TE):
    first = balanced_assignment(scores_TE)
    for _ in range(3):
        assert torch.equal(balanced_assignment(scores_TE.clone()), first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_balance_and_bound():
    scores_TE = random_scores(1024, 16, seed=4)
    expert_T = balanced_assignment(scores_TE.cuda())
    assert expert_T.device.type == "cuda"
    assert_balanced(expert_T.cpu(), default_capacities(1024, 16))
    assert_near_optimal(
        scores_TE, default_capacities(1024, 16), expert_T.cpu(), DEFAULT_REL_EPS * spread(scores_TE)
    )


# -- input validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores,capacity,eps,message",
    [
        (torch.zeros(6), None, None, "2-D"),
        (torch.zeros(2, 3, 4), None, None, "2-D"),
        (torch.zeros(4, 0), None, None, "at least one expert"),
        (torch.zeros(4, 2, dtype=torch.bool), None, None, "real numbers"),
        (torch.zeros(4, 2, dtype=torch.complex64), None, None, "real numbers"),
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), None, None, "finite"),
        (torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), None, None, "finite"),
        (torch.zeros(4, 2), torch.tensor([2, 1, 1]), None, r"shape \(2,\)"),
        (torch.zeros(4, 2), torch.tensor([[2, 2]]), None, r"shape \(2,\)"),
        (torch.zeros(4, 2), torch.tensor([5, -1]), None, "non-negative"),
        (torch.zeros(4, 2), torch.tensor([2, 1]), None, "sum to the number of tokens 4"),
        (torch.zeros(4, 2), torch.tensor([2.0, 2.0]), None, "integers"),
        (torch.zeros(4, 2), None, 0.0, "eps"),
        (torch.zeros(4, 2), None, -1.0, "eps"),
        (torch.zeros(4, 2), None, float("nan"), "eps"),
        (torch.randn(4, 2), None, 1e-30, "too small"),
    ],
)
def test_bad_inputs_raise_value_error(scores, capacity, eps, message):
    with pytest.raises(ValueError, match=message):
        balanced_assignment(scores, capacity, eps=eps)
