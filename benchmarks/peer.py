"""Peer suite: hashmoe's Qwen3-MoE-shaped top-k model against transformers' own `Qwen3MoeForCausalLM` of the same
config and weights, fwd+bwd, in one process; and the same hashmoe model with a hash router in place of top-k.

    python -m benchmarks.peer [--quick] [--no-write]      (or: hashmoe bench --suite peer)

The transformers model is built from a Qwen3MoeConfig and converted with `hashmoe convert` (so the weights are the
same, and the logits equal within 1e-5, checked before timing). Sizes: d_model 256, 4 layers of MoE FFNs, 4 query
heads and 2 key/value heads of width 64, QK-norm, RoPE, experts of d_ff 256, top-2 (renormalised) of E = 16 and
E = 64, no capacity for either, 16 x 128 tokens, vocabulary 4096, fp32 on CPU with 2 threads. Each library's
experts implementations for training are timed (transformers: eager and grouped_mm; hashmoe: the per-expert loop
and grouped_mm) and each library is judged by its best. transformers' third, batched_mm, gathers each route's
expert weights: at E = 16 one fwd+bwd step took 26.2 s (60x its eager; first run of this suite, 2026-12-06), an
inference choice, so it is left out (as hashmoe's own batched_mm). Round-robin (one step of each model per round),
median of the rounds after the warm-up ones. The table gives each model's expert load: the routers start untrained,
so top-k's routing is as unbalanced as its random router makes it, hash's as balanced as its random table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import QuietRounds, Report, Timing, markdown_table, parse_args, wait_until_quiet

VOCAB = 4096
FULL = dict(d_model=256, layers=4, d_ff=256, batch=16, seq=128, experts=(16, 64), k=2, steps=9, warmup=2)
QUICK = dict(d_model=32, layers=2, d_ff=32, batch=2, seq=16, experts=(4,), k=2, steps=2, warmup=1)
TARGET = 1.00


def native_config(sizes: dict, experts: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=sizes["d_model"], intermediate_size=4 * sizes["d_model"],
                          moe_intermediate_size=sizes["d_ff"], num_hidden_layers=sizes["layers"],
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                          max_position_embeddings=sizes["seq"], num_experts=experts,
                          num_experts_per_tok=sizes["k"], norm_topk_prob=True, tie_word_embeddings=False)


def build_pair(sizes: dict, experts: int, folder: Path):
    """(transformers' model, the same weights as a hashmoe folder)."""
    from transformers import Qwen3MoeForCausalLM

    from trainer.publish.convert import convert

    torch.manual_seed(0)
    native = Qwen3MoeForCausalLM(native_config(sizes, experts))
    with torch.no_grad():  # transformers zero-inits the routers: random routers, so tokens spread over experts
        for layer in native.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.02)
    native.save_pretrained(folder / "native")
    convert(folder / "native", folder / "hashmoe")
    return native.train(), folder / "hashmoe"


def load_hashmoe(folder: Path, implementation: str, **changes):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, experts_implementation=implementation,
                                                 **changes)
    return model.train()


def main(argv: list[str] | None = None) -> int:
    args = parse_args("peer", argv)
    sizes = QUICK if args.quick else FULL
    torch.set_num_threads(2)
    load = wait_until_quiet(args.quick)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (sizes["batch"], sizes["seq"]), generator=gen)
    report = Report(f"Peer suite: hashmoe vs transformers' Qwen3MoeForCausalLM, fwd+bwd ({'quick' if args.quick else 'full'})",
                    args.command, load)
    targets, rounds = [], QuietRounds(args.quick)
    for experts in sizes["experts"]:
        with tempfile.TemporaryDirectory() as tmp:
            native, folder = build_pair(sizes, experts, Path(tmp))
            models = {}
            for implementation in ("eager", "grouped_mm"):  # batched_mm: see the module docstring
                models[f"transformers Qwen3MoeForCausalLM, {implementation}"] = (native, implementation)
            for implementation in ("eager", "grouped_mm"):
                models[f"hashmoe top-{sizes['k']}, {implementation}"] = (load_hashmoe(folder, implementation), None)
            hashed = load_hashmoe(folder, "eager", router="hash", hash_function="random",
                                  hash_experts_per_tok=sizes["k"], norm_topk_prob=True)
            models[f"hashmoe hash, {sizes['k']} experts per token, eager"] = (hashed, None)
            check_equal(native, models[f"hashmoe top-{sizes['k']}, eager"][0], ids)
            timings = time_models(models, ids, sizes, rounds)
        rows, best = [], {}
        for name, timing in timings.items():
            library = "transformers" if name.startswith("transformers") else "hash" if " hash" in name else "hashmoe"
            best[library] = min(best.get(library, float("inf")), timing.median_ms)
            balance = load_balance(models[name][0], ids) if library != "transformers" else load_balance(
                models[f"hashmoe top-{sizes['k']}, eager"][0], ids)
            rows.append([name, round(timing.median_ms, 1), round(timing.iqr_ms, 1), balance])
            print(f"  E={experts:3d} {name:52s} {timing.median_ms:9.1f} ms (IQR {timing.iqr_ms:.1f})", flush=True)
        for row in rows:
            row.append(f"{row[1] / best['transformers']:.2f}x")
        report.tables.append(
            f"E = {experts}: d_model {sizes['d_model']}, {sizes['layers']} MoE layers, experts of d_ff {sizes['d_ff']}, "
            f"top-{sizes['k']} renormalised, no capacity, {sizes['batch']}x{sizes['seq']} tokens, fp32, CPU, torch "
            f"threads {torch.get_num_threads()}; median of {sizes['steps']} rounds after {sizes['warmup']} warm-up, "
            "models timed round-robin; the last column is the time over transformers' best.\n\n"
            + markdown_table(["model, experts implementation", "ms (median)", "IQR ms",
                              "expert load: max / mean, empty experts (per layer)", "vs transformers' best"], rows))
        targets.append([f"E={experts}: hashmoe top-{sizes['k']} best / transformers best",
                        f"<= {TARGET:.2f}x", f"{best['hashmoe'] / best['transformers']:.2f}x",
                        "met" if best["hashmoe"] <= TARGET * best["transformers"] else "not met"])
        targets.append([f"E={experts}: hashmoe hash / hashmoe top-{sizes['k']} best", "< 1.00x",
                        f"{best['hash'] / best['hashmoe']:.2f}x", "met" if best["hash"] < best["hashmoe"] else "not met"])
    if not args.quick:
        report.tables.append("Issue 25 targets (CPU):\n\n" + markdown_table(["target", "wanted", "measured", ""],
                                                                           targets))
    report.notes.append(rounds.note())
    report.emit(args.write)
    return 0


def load_balance(model, ids) -> str:
    """The routing the timed step computes: per MoE layer, the busiest expert's rows over the mean, and how many
    experts got none (the same routes for transformers' model, whose weights are the top-k model's)."""
    with torch.no_grad():
        loads = model(ids, use_cache=False, output_router_logits=True).expert_load
    return " ".join(f"{float(load.max() / load.float().mean()):.1f}/{int((load == 0).sum())}" for load in loads)


def check_equal(native, ours, ids) -> None:
    """The two models compute the same thing before their speed is compared (eval: no aux-loss noise)."""
    native.eval(), ours.eval()
    with torch.no_grad():
        diff = (native(ids[:2]).logits - ours(ids[:2]).logits).abs().max().item()
    native.train(), ours.train()
    if diff > 1e-4:
        raise SystemExit(f"benchmarks.peer: the converted model differs from transformers' by {diff:.2e}")


def time_models(models: dict, ids: torch.Tensor, sizes: dict, rounds: QuietRounds) -> dict[str, Timing]:
    def step(model, implementation):
        if implementation is not None:
            model.set_experts_implementation(implementation)
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids, use_cache=False).loss.backward()

    def one_round() -> list[float]:
        elapsed = []
        for model, implementation in models.values():
            start = time.perf_counter()
            step(model, implementation)
            elapsed.append(time.perf_counter() - start)
        return elapsed

    timings = {name: Timing() for name in models}
    for times in rounds.run(one_round, sizes["warmup"] + sizes["steps"])[sizes["warmup"]:]:
        for timing, seconds in zip(timings.values(), times):
            timing.seconds.append(seconds)
    return timings


if __name__ == "__main__":
    raise SystemExit(main())
