"""Balanced token -> expert assignment for BASE layers (Lewis et al. 2021, arXiv 2103.16716).

A BASE layer sends every token to exactly one expert, expert e taking exactly capacity_E[e] tokens, and picks
the assignment with the largest summed token-expert score: a transportation problem. We solve it with
Bertsekas' auction algorithm in its "similar objects" form (Bertsekas & Castanon 1989): expert e is one object
with capacity_E[e] interchangeable slots and one price, its lowest kept bid once full, so nothing is expanded
to T x T. Bidding is Jacobi (all free tokens bid at once) and vectorised over tokens and experts, with two
host syncs per round and no per-token Python, so the same code runs on CPU and CUDA.

Two choices keep the rounds few (~6 for T=4096, E=16 at the default eps). Each round every token re-bids at
current prices, holders included, so a full expert's lowest bid is the token that truly cares least about
staying, and no token is evicted only to bid straight back. Epsilon-scaling (phases at eps * 30**k down to
the target) stops price wars, where near-tied tokens (integer or duplicated scores) lift prices one eps per
round: a 256 x 16 integer problem at eps < 1/T takes 25 rounds instead of 267.

Shape suffixes: T tokens, E experts (L: only those with capacity > 0), B free tokens, P tokens of overfilled
experts, O the same tokens sorted by (expert, bid).
"""

from __future__ import annotations

import math

import torch

# Default eps as a fraction of the score spread (max over tokens of max_e - min_e of its scores). The bound
# T * eps is loose (on random scores the shortfall measures 100-1000x smaller), and BASE scores are noisy.
DEFAULT_REL_EPS = 1e-2
# Epsilon-scaling: phases at eps * EPS_SHRINK**k, the first no larger than START_REL_EPS * spread. Each
# phase restart costs a handful of rounds, so eps >= 1% of the spread runs in one phase; smaller eps (prone to
# price wars) starts there.
START_REL_EPS = 1e-2
EPS_SHRINK = 30.0


def default_capacities(
    num_tokens: int, num_experts: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """int64 [E]: T // E each, the first T % E experts one more (sums to T), the BASE layer split."""
    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    capacity_E = torch.full((num_experts,), num_tokens // num_experts, dtype=torch.int64, device=device)
    capacity_E[: num_tokens % num_experts] += 1
    return capacity_E


def _check_capacity(
    capacity_E: torch.Tensor | list[int], num_tokens: int, num_experts: int, device: torch.device
) -> torch.Tensor:
    capacity_E = torch.as_tensor(capacity_E, device=device)
    if capacity_E.is_floating_point() or capacity_E.is_complex() or capacity_E.dtype == torch.bool:
        raise ValueError(f"capacity_E must hold integers, got dtype {capacity_E.dtype}")
    if capacity_E.shape != (num_experts,):
        raise ValueError(
            f"capacity_E must have shape ({num_experts},), one per expert, got {tuple(capacity_E.shape)}"
        )
    if bool((capacity_E < 0).any()):
        raise ValueError(f"capacity_E must be non-negative, got {capacity_E.tolist()}")
    if int(capacity_E.sum()) != num_tokens:
        raise ValueError(
            f"capacity_E must sum to the number of tokens {num_tokens}, got {int(capacity_E.sum())}"
        )
    return capacity_E.long()


@torch.no_grad()
def balanced_assignment(
    scores_TE: torch.Tensor, capacity_E: torch.Tensor | None = None, eps: float | None = None
) -> torch.Tensor:
    """Returns expert index per token, int64 [T], each expert e used exactly capacity_E[e] times.

    Solves the BASE-layer assignment (Lewis et al. 2021, arXiv 2103.16716), max sum_t scores_TE[t, a_t], with
    the auction algorithm. capacity_E defaults to ``default_capacities(T, E)``. The result is on the device
    of scores_TE and is deterministic for a given input and device (ties go to the lower token index).

    Guarantee: objective >= optimum - T * eps (up to float rounding). The default eps is DEFAULT_REL_EPS (1%)
    of the score spread, max_t (max_e scores_TE[t, e] - min_e scores_TE[t, e]), so it does not depend on the
    scale or offset of the scores. Integer scores with eps < 1 / T give an exact optimum. The work is float32
    unless scores are float64/integer or eps is below 2**-14 of the spread; then it is float64.
    """
    if scores_TE.dim() != 2:
        raise ValueError(f"scores_TE must be 2-D [tokens, experts], got shape {tuple(scores_TE.shape)}")
    if scores_TE.is_complex() or scores_TE.dtype == torch.bool:
        raise ValueError(f"scores_TE must hold real numbers, got dtype {scores_TE.dtype}")
    T, E = scores_TE.shape
    if E == 0:
        raise ValueError("scores_TE must have at least one expert column")
    if capacity_E is None:
        capacity_E = default_capacities(T, E, scores_TE.device)
    else:
        capacity_E = _check_capacity(capacity_E, T, E, scores_TE.device)
    if eps is not None:
        eps = float(eps)
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be finite and > 0, got {eps}")
    if T and not bool(torch.isfinite(scores_TE).all()):
        raise ValueError("scores_TE must be finite, found NaN or inf")

    # Zero-capacity experts take no token; dropping them leaves every expert with a slot to bid for.
    live_L = capacity_E.nonzero().squeeze(1)
    if T == 0 or live_L.numel() == 1:  # nothing to choose (and no second-best expert to price against)
        return live_L.repeat_interleave(capacity_E[live_L])
    exact = scores_TE.dtype == torch.float64 or not scores_TE.is_floating_point()
    scores_LT = _centre(scores_TE, live_L, torch.float64 if exact else torch.float32)
    spread = -float(scores_LT.min())
    if spread == 0:  # every balanced assignment has the same objective
        return live_L.repeat_interleave(capacity_E[live_L])
    eps = DEFAULT_REL_EPS * spread if eps is None else eps
    if eps < 2**-36 * spread:
        raise ValueError(f"eps={eps} is too small for the score spread {spread}: prices could no longer rise")
    if eps < 2**-14 * spread and scores_LT.dtype == torch.float32:  # float32 would round eps-sized steps away
        scores_LT = _centre(scores_TE, live_L, torch.float64)
    return live_L[_auction(scores_LT, capacity_E[live_L], eps, spread)]


def _centre(scores_TE: torch.Tensor, live_L: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[L, T] copy with each token's best score at 0.

    Expert-major layout turns every reduction over experts into a fast elementwise pass over tokens. Shifting
    a token's row changes every assignment's objective by the same amount, and bounds all scores by the spread.
    """
    scores_LT = scores_TE.t().index_select(0, live_L).to(dtype)
    return scores_LT - scores_LT.amax(dim=0)


def _auction(scores_ET: torch.Tensor, capacity_E: torch.Tensor, eps: float, spread: float) -> torch.Tensor:
    """Jacobi auction on centred scores; E >= 2 and all capacities >= 1. Returns expert per token, int64 [T]."""
    E, T = scores_ET.shape
    device, dtype = scores_ET.device, scores_ET.dtype
    # Target eps times EPS_SHRINK**k, largest first, the first no larger than START_REL_EPS * spread.
    phase_eps = [eps]
    while phase_eps[0] * EPS_SHRINK <= START_REL_EPS * spread:
        phase_eps.insert(0, phase_eps[0] * EPS_SHRINK)
    # Each phase starts with prices >= 0 and within spread + eps of each other (eps-CS), and an unfilled
    # expert keeps its price; so the bids of an overfilled expert's tokens lie in [0, 2 * (spread + eps)].
    # Adding e * 4 * (spread + eps) to expert e's bids, in float64, lets one sort group those tokens by
    # expert with bids in order inside each group.
    offset_E = torch.arange(E, device=device, dtype=torch.float64) * (4 * (spread + phase_eps[0]))
    arange_T = torch.arange(T, device=device)
    owner_T = torch.full((T,), -1, dtype=torch.long, device=device)
    price_E = torch.zeros(E, dtype=dtype, device=device)
    free_B = arange_T
    for phase, eps in enumerate(phase_eps):
        price_E = price_E - price_E.min()  # a common shift changes nothing but keeps magnitudes small
        key_base_ET = scores_ET.double() + (offset_E + eps)[:, None]
        if phase:  # keep the last phase's prices and every holder still eps-happy at the smaller eps
            other_T = (scores_ET - price_E[:, None]).scatter_(0, owner_T[None], -math.inf).amax(dim=0)
            key_T = key_base_ET.gather(0, owner_T[None])[0] - other_T
            free_B = (key_T < (price_E.double() + offset_E)[owner_T]).nonzero().squeeze(1)
            owner_T = owner_T.index_fill(0, free_B, -1)
        while free_B.numel():
            value_ET = scores_ET - price_E[:, None]
            choice_T = owner_T.index_put((free_B,), value_ET.index_select(1, free_B).max(dim=0).indices)
            # Every token bids the price at which its expert stops beating its best alternative, plus eps:
            # the classic auction bid for free tokens, and for holders a refresh that can only have risen
            # since they won (other prices only rise). A holder bidding >= its expert's price is
            # eps-complementary slackness; it holds for all tokens at the end, so objective >= opt - T * eps.
            other_T = value_ET.scatter_(0, choice_T[None], -math.inf).amax(dim=0)
            key_T = key_base_ET.gather(0, choice_T[None])[0] - other_T
            count_E = torch.bincount(choice_T, minlength=E)
            over_E = count_E > capacity_E
            pool_P = over_E[choice_T].nonzero().squeeze(1)
            if not pool_P.numel():  # every expert exactly full
                owner_T = choice_T
                break
            # Overfilled experts keep their capacity_E[e] highest bids (one stable sort of just their tokens,
            # by expert then bid); the rest are free next round.
            key_O, order_O = key_T[pool_P].sort(descending=True, stable=True)
            order_O = pool_P[order_O]
            # Groups run from the highest expert index down: expert e's starts after the pool tokens of experts > e.
            end_E = pool_P.numel() + capacity_E - (count_E * over_E).cumsum(0)
            keep_O = arange_T[: pool_P.numel()] < end_E[choice_T[order_O]]
            free_B = order_O[~keep_O]
            owner_T = choice_T.index_fill(0, free_B, -1)
            # A full expert's price is its lowest kept bid: never above a holder's bid, never below the old price.
            lowest_E = torch.full_like(offset_E, math.inf).scatter_reduce_(0, choice_T, key_T, "amin")
            last_E = torch.where(over_E, key_O[(end_E - 1).clamp(max=pool_P.numel() - 1)], lowest_E)
            price_E = torch.where(count_E >= capacity_E, (last_E - offset_E).to(dtype), price_E)
    return owner_T
