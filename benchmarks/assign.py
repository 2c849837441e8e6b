"""Assign suite: the BASE-layer auction solver (models.assignment.balanced_assignment) against SciPy's
Hungarian method, and its share of a whole BASE layer's training step.

    python -m benchmarks.assign [--quick] [--no-write]      (or: hashmoe bench --suite assign)

1. Solver time vs tokens T and experts E on standard normal scores (float32, each expert takes T/E tokens),
   the median of REPEATS calls after one warm-up.
2. SciPy's `linear_sum_assignment` (maximize) on the expanded T x T problem (column j = one slot of expert
   j // (T/E)) where that is feasible (T <= SCIPY_MAX_T): its time, and the objective gap of the auction,
   (optimum - auction) / |optimum|, which the eps-optimality bound (T * eps, eps = 1% of the score spread)
   keeps small.
3. The solver's share of a BASE layer's fwd+bwd step at 4096 tokens, E=16, d_model 512, d_ff 2048: the
   layer (router with the assignment inside, expert bank, dispatch) timed whole, and the assignment alone
   on the same scores the router computes. Target: <= 10%.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import (
    QuietRounds,
    Report,
    Timing,
    markdown_table,
    parse_args,
    time_calls,
    wait_until_quiet,
)

FULL = dict(tokens=(1024, 2048, 4096, 16384), experts=(8, 16, 64), repeats=7, scipy_repeats=3,
            layer=dict(d_model=512, d_ff=2048, batch=16, seq=256, steps=10, warmup=2), layer_experts=16)
QUICK = dict(tokens=(256,), experts=(8,), repeats=2, scipy_repeats=1,
             layer=dict(d_model=64, d_ff=256, batch=2, seq=64, steps=2, warmup=1), layer_experts=8)
SCIPY_MAX_T = 2048
SHARE_TARGET = 0.10


def scipy_assignment(scores_TE: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Exact optimum by the Hungarian method on the expanded problem; (expert per token, seconds)."""
    from scipy.optimize import linear_sum_assignment

    T, E = scores_TE.shape
    slot_expert = torch.arange(E).repeat_interleave(T // E)
    cost = scores_TE.double()[:, slot_expert].numpy()
    start = time.perf_counter()
    rows, cols = linear_sum_assignment(cost, maximize=True)
    seconds = time.perf_counter() - start
    index = torch.empty(T, dtype=torch.long)
    index[torch.from_numpy(rows)] = slot_expert[torch.from_numpy(cols)]
    return index, seconds


def objective(scores_TE: torch.Tensor, index_T: torch.Tensor) -> float:
    return float(scores_TE.double().gather(1, index_T[:, None]).sum())


def solver_table(sizes: dict, report: Report, rounds: QuietRounds) -> None:
    from models.assignment import balanced_assignment

    rows = []
    for T in sizes["tokens"]:
        for E in sizes["experts"]:
            scores = torch.randn(T, E, generator=torch.Generator().manual_seed(T * 1000 + E))
            timing = time_calls(lambda s=scores: balanced_assignment(s), sizes["repeats"], 1, rounds)
            index = balanced_assignment(scores)
            assert torch.equal(torch.bincount(index, minlength=E), torch.full((E,), T // E)), "unbalanced"
            ours = objective(scores, index)
            scipy_ms = gap = "-"
            if T <= SCIPY_MAX_T:
                runs = rounds.run(lambda s=scores: scipy_assignment(s), sizes["scipy_repeats"])
                best = objective(scores, runs[0][0])
                scipy_ms = round(1e3 * statistics.median(s for _, s in runs), 1)
                gap = f"{(best - ours) / abs(best):.2e}"
                speedup = f"{scipy_ms / timing.median_ms:.3g}x"
            else:
                speedup = "-"
            rows.append([T, E, round(timing.median_ms, 2), scipy_ms, speedup, gap])
            print(f"  T={T:6d} E={E:3d} auction {timing.median_ms:8.2f} ms  scipy {scipy_ms} ms  gap {gap}",
                  flush=True)
    report.tables.append(
        f"Auction solver vs SciPy's Hungarian method (standard normal float32 scores, capacity T/E each; "
        f"auction: median of {sizes['repeats']} calls after 1 warm-up; SciPy: median of "
        f"{sizes['scipy_repeats']}, on the expanded T x T problem, only for T <= {SCIPY_MAX_T}):\n\n"
        + markdown_table(["tokens T", "experts E", "auction ms", "scipy ms", "auction speed-up",
                          "objective gap vs scipy"], rows))
    report.notes.append(
        f"SciPy is skipped above T={SCIPY_MAX_T}: the expanded problem is a dense T x T matrix (16384 tokens: "
        "2 GiB in float64) and the Hungarian method is O(T^3).")


def layer_share(sizes: dict, report: Report, rounds: QuietRounds) -> None:
    """BASE layer, hash layer and the assignment alone on the BASE router's scores, timed round-robin."""
    from benchmarks.layer import Bench
    from models.assignment import balanced_assignment

    E = sizes["layer_experts"]
    L = sizes["layer"]
    bench = Bench(L)
    T = bench.x.shape[0] * bench.x.shape[1]
    base_model, hash_model = bench.model_mlp(E, "base"), bench.model_mlp(E, "hash")
    base_mlp = base_model.model.layers[0].mlp
    with torch.no_grad():  # what BaseRouter computes before it assigns
        scores = bench.x.detach().reshape(T, -1).float() @ base_mlp.router.centroids.float().t()
    steps = {"base": bench.make_step(base_mlp)[0], "hash": bench.make_step(hash_model.model.layers[0].mlp)[0],
             "assign": lambda: balanced_assignment(scores)}

    def one_round() -> dict[str, float]:
        elapsed = {}
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            elapsed[name] = time.perf_counter() - start
        return elapsed

    kept = rounds.run(one_round, L["warmup"] + L["steps"])[L["warmup"]:]
    results = {name: Timing([r[name] for r in kept]) for name in steps}
    base_ms, hash_ms, assign_ms = (results[name].median_ms for name in ("base", "hash", "assign"))
    share = assign_ms / base_ms
    rows = [["BASE layer fwd+bwd (router + assignment + experts + dispatch)", round(base_ms, 1), "100%"],
            ["balanced_assignment alone, on the layer's scores", round(assign_ms, 2), f"{share:.1%}"],
            ["hash layer fwd+bwd, same sizes (no assignment)", round(hash_ms, 1), f"{hash_ms / base_ms:.0%}"]]
    report.tables.append(
        f"Share of the assignment in a BASE layer step: {T} tokens ({L['batch']}x{L['seq']}), E={E}, d_model "
        f"{L['d_model']}, d_ff {L['d_ff']}, fp32 CPU, timed round-robin (one of each per round), median of "
        f"{L['steps']} rounds after {L['warmup']} warm-up:"
        "\n\n" + markdown_table(["what", "ms (median)", "share of the BASE layer"], rows))
    met = "met" if share <= SHARE_TARGET else "NOT met"
    report.notes.append(f"Target: assignment <= {SHARE_TARGET:.0%} of the BASE layer's fwd+bwd at {T} tokens, E={E}: "
                        f"measured {share:.1%} ({assign_ms:.1f} of {base_ms:.1f} ms): {met}. The BASE layer is "
                        f"{base_ms / hash_ms:.2f}x the hash layer of the same size.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args("assign", argv)
    sizes = QUICK if args.quick else FULL
    torch.set_num_threads(2)
    load = wait_until_quiet(args.quick)
    report = Report(f"Assign suite: BASE auction solver ({'quick' if args.quick else 'full'})", args.command, load)
    rounds = QuietRounds(args.quick)
    solver_table(sizes, report, rounds)
    layer_share(sizes, report, rounds)
    report.notes.append(rounds.note())
    report.emit(args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
