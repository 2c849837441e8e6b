"""Convert suite: what `hashmoe convert` holds in memory, at two checkpoint sizes.

    python -m benchmarks.convert [--quick] [--no-write]      (or: hashmoe bench --suite convert)

Two random Qwen3-MoE checkpoints of the same layer shape (d_model 512, 16 experts of d_ff 512, fp32, saved by
transformers in shards of 200 MB) with 5 and 20 layers (about 0.27 and 1.1 GB) are converted into hashmoe folders
by `hashmoe convert SRC OUT --max-shard-size 0.2` in a process of its own. Its peak resident memory is sampled
every 50 ms: VmRSS, which counts the source's memory-mapped pages it has read (the page cache, reclaimable), and
RssAnon, what it allocated itself. The converter holds one layer and at most one output shard: RssAnon must not
grow with the checkpoint.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import Report, markdown_table, parse_args, wait_until_quiet
from benchmarks.data import measure

FULL = dict(hidden=512, experts=16, d_ff=512, layers=(5, 20), shard_gb=0.2)
QUICK = dict(hidden=64, experts=4, d_ff=64, layers=(2, 4), shard_gb=0.001)


def write_checkpoint(folder: Path, sizes: dict, layers: int) -> float:
    """A random Qwen3-MoE checkpoint; returns its size in MB."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=4096, hidden_size=sizes["hidden"], intermediate_size=2 * sizes["hidden"],
                            moe_intermediate_size=sizes["d_ff"], num_hidden_layers=layers, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=64, num_experts=sizes["experts"], num_experts_per_tok=2,
                            max_position_embeddings=256)
    model = Qwen3MoeForCausalLM(config)
    model.save_pretrained(folder, max_shard_size=f"{int(sizes['shard_gb'] * 1000)}MB")
    del model
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6


def main(argv: list[str] | None = None) -> int:
    args = parse_args("convert", argv)
    sizes = QUICK if args.quick else FULL
    load = wait_until_quiet(args.quick)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in sizes["layers"]:
            source, out = Path(tmp) / f"native-{layers}", Path(tmp) / f"hashmoe-{layers}"
            source_mb = write_checkpoint(source, sizes, layers)
            command = [sys.executable, "-m", "trainer.cli", "convert", str(source), str(out), "--max-shard-size",
                       str(sizes["shard_gb"])]
            anon = measure(command, field="RssAnon")
            rss = measure(command, field="VmRSS")
            out_mb = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6
            rows.append([layers, f"{source_mb:.0f}", f"{out_mb:.0f}", f"{anon['seconds']:.1f}",
                         f"{anon['peak_mb']:.0f}", f"{rss['peak_mb']:.0f}"])
            print(f"  {layers} layers, {source_mb:.0f} MB: {anon['seconds']:.1f} s, peak RssAnon "
                  f"{anon['peak_mb']:.0f} MB, peak VmRSS {rss['peak_mb']:.0f} MB", flush=True)
    report = Report(f"Convert suite: peak memory of hashmoe convert at two checkpoint sizes ({'quick' if args.quick else 'full'})",
                    args.command, load)
    report.tables.append(
        f"Qwen3-MoE checkpoints, d_model {sizes['hidden']}, {sizes['experts']} experts of d_ff {sizes['d_ff']}, fp32, "
        f"source and output shards of {sizes['shard_gb']} GB; peak memory of the converting process (sampled every "
        "50 ms): RssAnon = allocated by it, VmRSS = with the source's memory-mapped pages it read.\n\n"
        + markdown_table(["layers", "checkpoint MB", "output MB", "seconds", "peak RssAnon MB", "peak VmRSS MB"],
                         rows))
    report.emit(args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
