"""Fixed token -> expert hash tables for Hash Layers (Roller et al. 2021, arXiv 2106.04426).

Every builder is a pure function returning an int64 CPU tensor with values in [0, num_experts). Randomness
comes only from an explicit CPU ``torch.Generator`` seeded by the caller (never the global RNG, never
Python's salted ``hash()``), so every rank of a distributed job builds the same table without a broadcast.
This file is shipped inside exported model folders (``trust_remote_code``), so it imports only torch.

Shape suffixes: V vocabulary, E experts, N points, D embedding dim, K clusters, H hash heads.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import torch

# Largest prime below 2**30: with ids and coefficients < 2**30 every a*x + b*y + c stays below 2**62.
UNIVERSAL_HASH_PRIME = 1073741789


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_counts(counts_V: torch.Tensor) -> None:
    if counts_V.dim() != 1:
        raise ValueError(f"token_counts must be 1-D, got shape {tuple(counts_V.shape)}")
    if counts_V.is_complex() or counts_V.dtype == torch.bool:
        raise ValueError(f"token_counts must be real numbers, got dtype {counts_V.dtype}")
    if counts_V.numel() and not bool((counts_V >= 0).all()):  # also rejects NaN
        raise ValueError("token_counts must be non-negative")


def random_table(num_keys: int, num_experts: int, seed: int) -> torch.Tensor:
    """Uniform random key -> expert map: the "Random Hash" of Roller et al. (2021), Sec. 3.

    Returns ``table_V`` (int64, CPU) of length ``num_keys``.
    """
    _check_positive("num_keys", num_keys)
    _check_positive("num_experts", num_experts)
    return torch.randint(num_experts, (num_keys,), generator=_generator(seed), dtype=torch.int64)


def random_distinct_table(num_keys: int, num_experts: int, k: int, seed: int) -> torch.Tensor:
    """k distinct uniformly random experts per key (DeepSeek-V4's `tid2eid` shape, transposed): ``table_KV``."""
    _check_positive("num_keys", num_keys)
    _check_positive("num_experts", num_experts)
    order_VE = torch.rand(num_keys, num_experts, generator=_generator(seed)).argsort(dim=1)
    return order_VE[:, :k].t().contiguous()


def balanced_table(token_counts: torch.Tensor, num_experts: int, seed: int | None = None) -> torch.Tensor:
    """The "Balanced assignment" hash of Roller et al. (2021), Sec. 3: equalise token mass over experts.

    Greedy: tokens one after another each go to the expert with the least mass so far (ties to the lowest
    expert index). The order is a seeded random permutation of the vocabulary (``seed``), or, with ``seed=None``,
    longest-processing-time (LPT): decreasing count, ties by id. LPT balances best, but it deals the frequent
    tokens round-robin and then fills the experts with rare tokens in frequency order, so each expert's
    vocabulary is a narrow frequency band; in the review of issue 15 it lost to a random table in 3 of 3
    settings, and the random order did better. Zero-count tokens carry no mass, so they are dealt round-robin
    in the same order (the j-th such token to expert ``j % E``) to keep the vocabulary split even. With
    all-equal counts the result is an even split (sizes differ by <= 1).

    Bound, for any order: max expert mass <= mean expert mass + max single count. The heaviest expert received
    its last token while it was the lightest, i.e. at most the mean, and that token weighs at most the max count.
    """
    _check_positive("num_experts", num_experts)
    counts_V = torch.as_tensor(token_counts).detach().cpu()
    _check_counts(counts_V)
    table = [0] * counts_V.numel()  # a list: per-element tensor writes are ~50x slower
    if seed is None:
        order_V = torch.sort(counts_V, descending=True, stable=True).indices
    else:
        order_V = torch.randperm(counts_V.numel(), generator=_generator(seed))
    counts = counts_V.tolist()  # Python ints for integer counts: exact sums, no float drift
    heap = [(0, e) for e in range(num_experts)]  # (mass, expert) orders ties by lowest index
    zeros_seen = 0
    for tok in order_V.tolist():
        if counts[tok] == 0:
            table[tok] = zeros_seen % num_experts
            zeros_seen += 1
            continue
        mass, e = heapq.heappop(heap)
        table[tok] = e
        heapq.heappush(heap, (mass + counts[tok], e))
    return torch.tensor(table, dtype=torch.int64)


def expert_mass(table: torch.Tensor, token_counts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Token mass routed to each expert, ``mass_E`` (float64): sum of ``token_counts`` over its tokens."""
    _check_positive("num_experts", num_experts)
    table_V = torch.as_tensor(table).detach().cpu()
    counts_V = torch.as_tensor(token_counts).detach().cpu()
    _check_counts(counts_V)
    if table_V.shape != counts_V.shape:
        raise ValueError(f"table shape {tuple(table_V.shape)} != token_counts shape {tuple(counts_V.shape)}")
    if table_V.numel() and (int(table_V.min()) < 0 or int(table_V.max()) >= num_experts):
        raise ValueError(f"table values must lie in [0, {num_experts})")
    mass_E = torch.zeros(num_experts, dtype=torch.float64)
    return mass_E.index_add_(0, table_V.long(), counts_V.to(torch.float64))


def token_counts(id_batches: torch.Tensor | Iterable[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Frequency of every token id, ``counts_V`` (int64), as used to fit the balanced hash.

    ``id_batches`` is one integer tensor or an iterable of them, of any shapes (e.g. a data loader's
    ``input_ids``); it is consumed once. Ids outside [0, vocab_size) raise ValueError naming the first one.
    """
    _check_positive("vocab_size", vocab_size)
    batches = [id_batches] if isinstance(id_batches, torch.Tensor) else id_batches
    counts_V = torch.zeros(vocab_size, dtype=torch.int64)
    for batch in batches:
        ids = torch.as_tensor(batch).detach().cpu().reshape(-1)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"id_batches must hold integer tensors, got dtype {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= vocab_size)]
        if bad.numel():
            raise ValueError(f"token id {int(bad[0])} is out of range [0, {vocab_size})")
        counts_V += torch.bincount(ids.long(), minlength=vocab_size)
    return counts_V


def _sq_dists(x_ND: torch.Tensor, xsq_N: torch.Tensor, c_KD: torch.Tensor) -> torch.Tensor:
    # Expanded |x|^2 - 2 x.c + |c|^2 needs O(N*K) memory instead of O(N*K*D) for a vocabulary-sized N;
    # |x|^2 is passed in because it is the same in every call.
    d2_NK = torch.addmm(xsq_N.unsqueeze(1), x_ND, c_KD.T, alpha=-2.0) + (c_KD * c_KD).sum(1)
    return d2_NK.clamp_min_(0.0)


def _kmeans_pp_init(x_ND: torch.Tensor, xsq_N: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    n = x_ND.shape[0]
    first = int(torch.randint(n, (1,), generator=g))
    centroids = [x_ND[first]]
    d2_N = _sq_dists(x_ND, xsq_N, x_ND[first : first + 1])[:, 0]
    for _ in range(1, k):
        total = float(d2_N.sum())
        if total > 0:
            idx = int(torch.multinomial(d2_N.double() / total, 1, generator=g))
        else:  # fewer distinct points than k: every point already coincides with a centroid
            idx = int(torch.randint(n, (1,), generator=g))
        centroids.append(x_ND[idx])
        d2_N = torch.minimum(d2_N, _sq_dists(x_ND, xsq_N, x_ND[idx : idx + 1])[:, 0])
    return torch.stack(centroids)


def _update_centroids(x_ND: torch.Tensor, assign_N: torch.Tensor, old_KD: torch.Tensor) -> torch.Tensor:
    k = old_KD.shape[0]
    sizes_K = torch.bincount(assign_N, minlength=k)
    new_KD = torch.zeros_like(old_KD).index_add_(0, assign_N, x_ND)
    new_KD /= sizes_K.clamp_min(1).unsqueeze(1).to(x_ND.dtype)
    empty = torch.nonzero(sizes_K == 0).flatten().tolist()
    if not empty:
        return new_KD
    # Empty clusters restart at the points worst served by their centroid (farthest first, ties by
    # lowest index): deterministic without touching the generator, and it reduces the k-means loss.
    spread_N = ((x_ND - old_KD[assign_N]) ** 2).sum(1)
    for c in empty:
        idx = int(spread_N.argmax())
        new_KD[c] = x_ND[idx]
        spread_N[idx] = -1.0
    return new_KD


def kmeans(points_ND: torch.Tensor, k: int, seed: int, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded k-means (k-means++ init, then Lloyd), in float32 on CPU.

    Returns ``(assign_N, centroids_KD)``: ``assign_N[i]`` is the nearest centroid of point i (ties to the
    lower index). Lloyd stops when the assignment no longer changes or after ``iters`` updates. Same torch
    build and inputs give the same result; float reductions may round differently across BLAS builds, so
    compute a table once and store it with the model rather than rebuilding it on every machine.
    """
    _check_positive("k", k)
    if not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if points_ND.dim() != 2:
        raise ValueError(f"points_ND must be 2-D [N, D], got shape {tuple(points_ND.shape)}")
    if points_ND.shape[0] < k:
        raise ValueError(f"points_ND has {points_ND.shape[0]} points, fewer than k={k}")
    x_ND = points_ND.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(x_ND).all()):
        raise ValueError("points_ND must be finite")
    xsq_N = (x_ND * x_ND).sum(1)
    centroids_KD = _kmeans_pp_init(x_ND, xsq_N, k, _generator(seed))
    assign_N = _sq_dists(x_ND, xsq_N, centroids_KD).argmin(1)
    for _ in range(iters):
        centroids_KD = _update_centroids(x_ND, assign_N, centroids_KD)
        new_N = _sq_dists(x_ND, xsq_N, centroids_KD).argmin(1)
        if torch.equal(new_N, assign_N):
            break
        assign_N = new_N
    return assign_N, centroids_KD


def _check_embeddings(embeddings_VD: torch.Tensor, num_experts: int) -> None:
    _check_positive("num_experts", num_experts)
    if embeddings_VD.dim() != 2:
        raise ValueError(f"embeddings_VD must be 2-D [V, D], got shape {tuple(embeddings_VD.shape)}")
    if embeddings_VD.shape[0] < num_experts:
        raise ValueError(
            f"embeddings_VD has {embeddings_VD.shape[0]} rows, fewer than num_experts={num_experts}"
        )


def clustered_table(embeddings_VD: torch.Tensor, num_experts: int, seed: int) -> torch.Tensor:
    """The "Clustered Hashes" of Roller et al. (2021), Sec. 3: expert = k-means cluster of the token's
    embedding (from a trained dense model), so similar tokens share an expert."""
    _check_embeddings(embeddings_VD, num_experts)
    return kmeans(embeddings_VD, num_experts, seed)[0]


def dispersed_table(embeddings_VD: torch.Tensor, num_experts: int, seed: int) -> torch.Tensor:
    """The "Dispersed Hashes" of Roller et al. (2021), Sec. 3: similar tokens go to *different* experts.

    Tokens are clustered with k-means (k = num_experts), then dealt round-robin cluster by cluster, each
    cluster in order of distance to its centroid (ties by id). Each cluster starts where the previous one
    stopped (offset = tokens dealt so far mod E), so a cluster of <= E tokens lands on pairwise different
    experts and expert sizes differ by at most 1 overall.
    """
    _check_embeddings(embeddings_VD, num_experts)
    assign_V, centroids_KD = kmeans(embeddings_VD, num_experts, seed)
    x_VD = embeddings_VD.detach().to(device="cpu", dtype=torch.float32)
    dist_V = ((x_VD - centroids_KD[assign_V]) ** 2).sum(1)
    # Two stable sorts give lexicographic order (cluster, distance, id).
    by_dist_V = torch.sort(dist_V, stable=True).indices
    order_V = by_dist_V[torch.sort(assign_V[by_dist_V], stable=True).indices]
    table_V = torch.empty_like(assign_V)
    table_V[order_V] = torch.arange(order_V.numel()) % num_experts
    return table_V


def universal_hash_params(num_heads: int, seed: int) -> torch.Tensor:
    """Seeded coefficients ``params_H3`` (int64) of ``((a*prev + b*cur + c) mod P) mod E``, one row
    (a, b, c) per hash head, with 1 <= a, b < P and 0 <= c < P (Carter-Wegman style universal hashing),
    for the "Bigram Hash" of Roller et al. (2021), Sec. 3, over an unbounded set of token pairs."""
    _check_positive("num_heads", num_heads)
    g = _generator(seed)
    p = UNIVERSAL_HASH_PRIME
    ab_H2 = torch.randint(1, p, (num_heads, 2), generator=g, dtype=torch.int64)
    c_H1 = torch.randint(0, p, (num_heads, 1), generator=g, dtype=torch.int64)
    return torch.cat([ab_H2, c_H1], dim=1)


def bigram_hash(
    prev_ids: torch.Tensor, cur_ids: torch.Tensor, params_3: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Expert of each (previous, current) token pair: ``((a*prev + b*cur + c) mod P) mod E`` (int64).

    The "Bigram Hash" of Roller et al. (2021), Sec. 3. ``prev_ids`` and ``cur_ids`` broadcast against each
    other; ``params_3`` is one (a, b, c) row, or ``[H, 3]`` for H heads (output gains a trailing H dim).
    Ids must lie in [0, P): then every intermediate stays below 2**62 in int64. Runs on the ids' device.
    """
    _check_positive("num_experts", num_experts)
    if params_3.shape[-1:] != (3,) or params_3.dim() > 2:
        raise ValueError(f"params_3 must have shape [3] or [H, 3], got {tuple(params_3.shape)}")
    for name, ids in (("prev_ids", prev_ids), ("cur_ids", cur_ids)):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
        # Range check only on CPU: on an accelerator it would force a host sync in every forward pass.
        # Skipped under torch.compile / torch.export, where the ids are symbolic.
        if ids.device.type == "cpu" and ids.numel() and not torch.compiler.is_compiling():
            if int(ids.min()) < 0 or int(ids.max()) >= UNIVERSAL_HASH_PRIME:
                raise ValueError(f"{name} must lie in [0, {UNIVERSAL_HASH_PRIME})")
    params = params_3.to(device=cur_ids.device, dtype=torch.int64)
    a, b, c = params.unbind(-1)
    prev, cur = prev_ids.long(), cur_ids.long()
    if params.dim() == 2:
        prev, cur = prev.unsqueeze(-1), cur.unsqueeze(-1)
    return (a * prev + b * cur + c) % UNIVERSAL_HASH_PRIME % num_experts
