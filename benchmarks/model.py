"""Whole-model suite: fwd+bwd of a HashMoEForCausalLM whose every FFN is a 16-expert hash MoE, against its dense
twin (the same model with dense FFNs of the experts' width: equal active parameters), in one process.

    python -m benchmarks.model [--quick] [--no-write]      (or: hashmoe bench --suite model)

Sizes: d_model 256, 4 layers, 4 heads, d_ff 1024 (dense and each expert), 16 x 128 tokens, vocabulary 4096 with
Zipf-distributed token ids (as the layer suite), hash routing with the balanced table fitted on a separate
sample; fp32 on CPU with 2 threads. Timed round-robin (one step of each model per round), median of the rounds
after the warm-up ones, both implementations of the experts (grouped_mm and the per-expert loop).
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import QuietRounds, Report, Timing, markdown_table, parse_args, wait_until_quiet

VOCAB = 4096
FULL = dict(d_model=256, layers=4, d_ff=1024, batch=16, seq=128, experts=16, steps=15, warmup=3)
QUICK = dict(d_model=32, layers=2, d_ff=64, batch=2, seq=16, experts=4, steps=2, warmup=1)
TARGET = 1.20


def build(sizes: dict, moe: bool, implementation: str | None = None):
    from models import HashMoEConfig, HashMoEForCausalLM

    torch.manual_seed(0)
    config = HashMoEConfig(vocab_size=VOCAB, hidden_size=sizes["d_model"], intermediate_size=sizes["d_ff"],
                           num_hidden_layers=sizes["layers"], num_attention_heads=4,
                           max_position_embeddings=sizes["seq"], num_experts=sizes["experts"], router="hash",
                           hash_function="balanced",
                           moe_layers=list(range(sizes["layers"])) if moe else [],
                           experts_implementation=implementation)
    return HashMoEForCausalLM(config).train()


def main(argv: list[str] | None = None) -> int:
    args = parse_args("model", argv)
    sizes = QUICK if args.quick else FULL
    torch.set_num_threads(2)
    load = wait_until_quiet(args.quick)
    gen = torch.Generator().manual_seed(0)
    probs = 1.0 / (torch.arange(1, VOCAB + 1, dtype=torch.float64) + 2.7)
    ids = torch.multinomial(probs / probs.sum(), sizes["batch"] * sizes["seq"], replacement=True,
                            generator=gen).view(sizes["batch"], sizes["seq"])
    counts = torch.bincount(torch.multinomial(probs / probs.sum(), 1_000_000, replacement=True, generator=gen),
                            minlength=VOCAB)
    models = {"dense twin": build(sizes, False), "all-MoE hash, grouped_mm": build(sizes, True, "grouped_mm"),
              "all-MoE hash, eager (loop)": build(sizes, True, "eager")}
    for name, model in models.items():
        if "MoE" in name:
            model.fit_hash_tables(token_counts=counts)

    def step(model):
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids, use_cache=False).loss.backward()

    timings = {name: Timing() for name in models}

    def one_round() -> list[float]:
        elapsed = []
        for model in models.values():
            start = time.perf_counter()
            step(model)
            elapsed.append(time.perf_counter() - start)
        return elapsed

    rounds = QuietRounds(args.quick)
    for times in rounds.run(one_round, sizes["warmup"] + sizes["steps"])[sizes["warmup"]:]:
        for timing, seconds in zip(timings.values(), times):
            timing.seconds.append(seconds)
    dense_ms = timings["dense twin"].median_ms
    rows = []
    for name, timing in timings.items():
        params = sum(p.numel() for p in models[name].parameters())
        rows.append([name, f"{params / 1e6:.1f}M", round(timing.median_ms, 1), round(timing.iqr_ms, 1),
                     f"{timing.median_ms / dense_ms:.2f}x"])
        print(f"  {name:30s} {timing.median_ms:9.1f} ms (IQR {timing.iqr_ms:.1f})", flush=True)
    report = Report(f"Whole-model suite: all-MoE vs dense twin, fwd+bwd ({'quick' if args.quick else 'full'})",
                    args.command, load)
    report.tables.append(
        f"d_model {sizes['d_model']}, {sizes['layers']} layers, every FFN a {sizes['experts']}-expert hash MoE "
        f"(balanced table) vs dense d_ff {sizes['d_ff']} (= each expert's), {sizes['batch']}x{sizes['seq']} tokens, "
        f"fp32, CPU, torch threads {torch.get_num_threads()}; median of {sizes['steps']} rounds after "
        f"{sizes['warmup']} warm-up, models timed round-robin.\n\n"
        + markdown_table(["model", "params", "ms (median)", "IQR ms", "vs dense"], rows))
    ratio = timings["all-MoE hash, grouped_mm"].median_ms / dense_ms
    if not args.quick:
        report.tables.append("Issue 14 target (CPU):\n\n" + markdown_table(
            ["target", "wanted", "measured", ""],
            [[f"whole model all-MoE E={sizes['experts']} / dense", f"<= {TARGET:.2f}x", f"{ratio:.2f}x",
              "met" if ratio <= TARGET else "not met"]]))
    report.notes.append(rounds.note())
    report.emit(args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
