"""Balanced token -> expert assignment for BASE layers (Lewis et al. 2021, arXiv 2103.16716).

A BASE layer sends every token to exactly one expert, expert e taking exactly capacity_E[e] tokens, and picks
the assignment that maximises the summed token-expert affinity. That is a transportation problem, solved here
with Bertsekas' auction algorithm in its "similar objects" form (Bertsekas & Castanon 1989): expert e is one
object with capacity_E[e] interchangeable slots, so a round costs O(B * E + T) rather than O(T * T) on the
expanded problem. Bidding is Jacobi (every unassigned token bids at once) and fully vectorised, so the same
code runs on CPU and CUDA with one host sync per round; epsilon-scaling keeps the number of rounds small.

Shape suffixes: T tokens, E experts, C slots per expert (max capacity, +1 trash column), B bidders this round,
K lowest slots looked at this round.
"""

from __future__ import annotations

import math

import torch

# Default eps as a fraction of the score spread (largest per-token max - min over experts): the per-token
# shortfall from the optimum is at most eps, i.e. 0.1% of the spread.
DEFAULT_REL_EPS = 1e-3
# Epsilon-scaling schedule: first phase at START_REL_EPS * spread, each later phase eps / EPS_SHRINK.
START_REL_EPS = 0.1
EPS_SHRINK = 8.0


def default_capacities(num_tokens: int, num_experts: int, device: torch.device | str | None = None) -> torch.Tensor:
    """int64 [E]: T // E each, the first T % E experts one more (sums to T), as in BASE layers' equal split."""
    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    capacity_E = torch.full((num_experts,), num_tokens // num_experts, dtype=torch.int64, device=device)
    capacity_E[: num_tokens % num_experts] += 1
    return capacity_E


def _check_capacity(capacity_E: torch.Tensor, num_tokens: int, num_experts: int, device) -> torch.Tensor:
    capacity_E = torch.as_tensor(capacity_E, device=device)
    if capacity_E.is_floating_point() or capacity_E.is_complex() or capacity_E.dtype == torch.bool:
        raise ValueError(f"capacity_E must be an integer tensor, got dtype {capacity_E.dtype}")
    if capacity_E.shape != (num_experts,):
        raise ValueError(f"capacity_E must have shape ({num_experts},) (one per expert), got {tuple(capacity_E.shape)}")
    if bool((capacity_E < 0).any()):
        raise ValueError("capacity_E must be non-negative")
    if int(capacity_E.sum()) != num_tokens:
        raise ValueError(f"capacity_E must sum to the number of tokens {num_tokens}, got {int(capacity_E.sum())}")
    return capacity_E.long()


@torch.no_grad()
def balanced_assignment(
    scores_TE: torch.Tensor, capacity_E: torch.Tensor | None = None, eps: float | None = None
) -> torch.Tensor:
    """Assign each token to one expert, maximising sum_t scores_TE[t, a_t] under exact capacities.

    This is the balanced assignment of BASE layers (Lewis et al. 2021, arXiv 2103.16716), solved with the
    auction algorithm. Returns int64 [T] on the device of scores_TE; expert e is used exactly capacity_E[e]
    times (default: ``default_capacities(T, E)``). Deterministic for a given input and device.

    Guarantee: objective >= optimum - T * eps. The default eps is DEFAULT_REL_EPS (1e-3) times the score
    spread, max_t (max_e scores_TE[t, e] - min_e scores_TE[t, e]); with integer scores, any eps < 1 / T gives
    an exact optimum. Work is float32 unless eps is below 2**-14 of the spread, then float64.
    """
    if scores_TE.dim() != 2:
        raise ValueError(f"scores_TE must be 2-D [tokens, experts], got shape {tuple(scores_TE.shape)}")
    if scores_TE.is_complex() or scores_TE.dtype == torch.bool:
        raise ValueError(f"scores_TE must be real numbers, got dtype {scores_TE.dtype}")
    T, E = scores_TE.shape
    if E == 0:
        raise ValueError("scores_TE must have at least one expert column")
    device = scores_TE.device
    if capacity_E is None:
        capacity_E = default_capacities(T, E, device)
    else:
        capacity_E = _check_capacity(capacity_E, T, E, device)
    if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if T and not bool(torch.isfinite(scores_TE).all()):
        raise ValueError("scores_TE must be finite (found NaN or inf)")

    # Zero-capacity experts can take no token; dropping them leaves every column with a slot to bid for.
    live_L = capacity_E.nonzero().squeeze(1)
    if T == 0 or live_L.numel() == 1:
        return live_L.repeat_interleave(capacity_E[live_L])
    # A per-token shift changes every assignment's objective by the same amount, so centre each row at 0:
    # values then stay within [-spread, 0] and float32 keeps eps-sized price steps.
    scores_TL = scores_TE[:, live_L].double()
    scores_TL = scores_TL - scores_TL.max(dim=1, keepdim=True).values
    spread = -float(scores_TL.min())
    if spread == 0:  # all assignments tie
        return live_L.repeat_interleave(capacity_E[live_L])
    eps = DEFAULT_REL_EPS * spread if eps is None else float(eps)
    if eps < 2**-40 * spread:
        raise ValueError(f"eps={eps} is too small relative to the score spread {spread} for float64")
    dtype = torch.float32 if eps >= 2**-14 * spread else torch.float64
    owner_T = _auction(scores_TL.to(dtype), capacity_E[live_L], eps, START_REL_EPS * spread)
    return live_L[owner_T]


def _auction(scores_TE: torch.Tensor, capacity_E: torch.Tensor, eps: float, start_eps: float) -> torch.Tensor:
    """Jacobi auction with epsilon-scaling; E >= 2 and every capacity >= 1. Returns expert per token."""
    T, E = scores_TE.shape
    device, dtype = scores_TE.device, scores_TE.dtype
    C = int(capacity_E.max())
    arange_E1 = torch.arange(E, device=device)[:, None]
    # Slot (e, c) for c < capacity_E[e] is real; the rest, and trash column C, stay at +inf price so they
    # never look cheap, and rejected bids are written into column C instead of branching on the host.
    real_EC = torch.arange(C + 1, device=device) < capacity_E[:, None]
    inf = torch.tensor(math.inf, dtype=dtype, device=device)
    slot_tok_EC = torch.full((E, C + 1), -1, dtype=torch.long, device=device)
    price_E = torch.zeros(E, dtype=dtype, device=device)

    phase_eps = [eps]
    while phase_eps[-1] * EPS_SHRINK < start_eps:
        phase_eps.append(phase_eps[-1] * EPS_SHRINK)
    for i, ph_eps in enumerate(reversed(phase_eps)):
        # Restart the phase from the last prices: holders that are still ph_eps-happy (own value within
        # ph_eps of their best) keep their slot, re-priced at their expert's price, the rest bid again.
        # This keeps eps-complementary slackness, so each phase ends with objective >= optimum - T * ph_eps.
        price_E = price_E - price_E.min()  # a common shift changes nothing but keeps magnitudes small
        slot_bid_EC = torch.where(real_EC, price_E[:, None], inf)
        if i == 0:
            bidders_B = torch.arange(T, device=device)
        else:
            value_TE = scores_TE - price_E
            top_val_T2, top_idx_T2 = value_TE.topk(2, dim=1)
            tok_EC = slot_tok_EC.clamp(min=0)
            other_EC = torch.where(top_idx_T2[tok_EC, 0] == arange_E1, top_val_T2[tok_EC, 1], top_val_T2[tok_EC, 0])
            margin_EC = value_TE[tok_EC, arange_E1] - other_EC + ph_eps
            keep_EC = real_EC & (slot_tok_EC >= 0) & (margin_EC >= 0)
            bidders_B = slot_tok_EC[real_EC & (slot_tok_EC >= 0) & ~keep_EC]
            slot_tok_EC = torch.where(keep_EC, slot_tok_EC, -1)
            slot_bid_EC = torch.where(keep_EC, price_E[:, None] + margin_EC, slot_bid_EC)
            price_E = slot_bid_EC.amin(dim=1)
        while (B := bidders_B.numel()) > 0:
            value_BE = scores_TE[bidders_B] - price_E
            top_val_B2, top_idx_B2 = value_BE.topk(2, dim=1)
            target_B = top_idx_B2[:, 0]
            # Standard auction bid: raise the price until the token is indifferent between its best and
            # second-best expert, plus ph_eps so prices strictly rise and the auction terminates.
            bid_B = price_E[target_B] + (top_val_B2[:, 0] - top_val_B2[:, 1]) + ph_eps
            # Within each expert, the r-th highest bidder challenges the r-th cheapest slot; both sequences are
            # monotone, so "bid > slot price" accepts exactly the top-capacity bids of holders + bidders.
            order_B = bid_B.argsort(descending=True, stable=True)
            bidders_B, target_B, bid_B = bidders_B[order_B], target_B[order_B], bid_B[order_B]
            onehot_BE = torch.nn.functional.one_hot(target_B, E)
            rank_B = onehot_BE.cumsum(0).gather(1, target_B[:, None]).squeeze(1) - 1
            K = min(B, C)
            low_bid_EK, low_slot_EK = slot_bid_EC.topk(K, dim=1, largest=False)
            in_reach_B = rank_B < K
            rank_B = rank_B.clamp(max=K - 1)
            accept_B = in_reach_B & (bid_B > low_bid_EK[target_B, rank_B])
            slot_B = torch.where(accept_B, low_slot_EK[target_B, rank_B], C)
            evicted_B = slot_tok_EC[target_B, slot_B]
            slot_tok_EC[target_B, slot_B] = bidders_B
            slot_bid_EC[target_B, slot_B] = torch.where(accept_B, bid_B, inf)
            # Everyone holding a slot paid at least its expert's new price, so eps-CS survives the rise.
            price_E = slot_bid_EC.amin(dim=1)
            next_B = torch.where(accept_B, evicted_B, bidders_B)
            bidders_B = next_B[next_B >= 0]

    owner_T = torch.empty(T, dtype=torch.long, device=device)
    owner_T[slot_tok_EC[real_EC]] = arange_E1.expand(E, C + 1)[real_EC]
    return owner_T
