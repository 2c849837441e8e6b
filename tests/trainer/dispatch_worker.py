"""On 2 ranks: the expert-parallel layers (the dispatcher with the all-to-all exchange, each rank a bank of half
the experts) must give the outputs and gradients of the same model run in one process on each rank's tokens.
Expert gradients collect both ranks' tokens, so they are compared with the sum over ranks of the reference's."""

import copy
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

from models import HashMoEConfig, HashMoEForCausalLM
from trainer.parallel.distributed import init_distributed, resolve_env, shutdown_distributed
from trainer.parallel.expert_parallel import expert_parallel_layers, parallelize
from trainer.run.config import ParallelConfig

CASES = {"hash": dict(router="hash", hash_function="random"),
         "hash-multi": dict(router="hash", hash_function="random", hash_heads=2),
         "topk": dict(router="topk", capacity_factor=None),
         "switch-capacity": dict(router="switch", capacity_factor=1.0, router_jitter=0.0),  # drops routes
         "skewed": dict(router="hash", hash_function="position"),
         "one-rank": dict(router="switch", capacity_factor=None, router_jitter=0.0),
         # the 2026 block: SwiGLU experts and a shared expert, GQA, RoPE, RMSNorm, QK-norm, a sigmoid router
         "modern": dict(router="topk", capacity_factor=None, gated_ffn=True, hidden_act="silu", num_shared_experts=1,
                        scoring_func="sigmoid", norm_topk_prob=False, routed_scaling_factor=2.0,
                        position_embedding_type="rope", norm_type="rmsnorm", qk_norm=True, num_key_value_heads=1,
                        head_dim=12),
         # DeepSeek-V4's layout: a hash layer of k whole experts under a sqrtsoftplus gate, a learned layer above
         "v4-layout": dict(router=["hash", "topk"], hash_function="random", hash_experts_per_tok=2,
                           hash_gate="sqrtsoftplus", scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
                           capacity_factor=None, gated_ffn=True, hidden_act="silu", num_shared_experts=1),
         "hash-multi-gated": dict(router="hash", hash_function="random", hash_heads=2, gated_ffn=True)}


def main(out_path: str) -> None:
    env = resolve_env()
    init_distributed(env, ParallelConfig().collective_timeout_s)
    results = {}
    for implementation in ("grouped_mm", "eager"):
        for name, extra in CASES.items():
            results[f"{name}/{implementation}"] = compare(name, extra, implementation, env.rank)
    with open(os.path.join(out_path, f"rank_{env.rank}.json"), "w") as f:
        json.dump(results, f)
    shutdown_distributed()


def compare(name: str, extra: dict, implementation: str, rank: int) -> dict:
    torch.manual_seed(0)
    config = HashMoEConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=16, moe_layers=[0, 1], num_experts=4,
                           experts_implementation=implementation, **extra)
    model = HashMoEForCausalLM(config)
    if name == "one-rank":  # experts 2 and 3 (ep rank 1) never win: rank 1 receives no rows at all
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.router.weight[2:] = 0.0
                layer.mlp.router.weight[1] = -layer.mlp.router.weight[0]
    reference = copy.deepcopy(model)
    model = parallelize(model, 2, rank)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
        "steps_per_print": 10**9})
    # different tokens per rank; "skewed": position hashing with short sequences leaves experts idle
    ids = torch.randint(0, 50, (2, 6 if name == "skewed" else 8), generator=torch.Generator().manual_seed(rank))
    out = engine.module(ids, labels=ids, use_cache=False)
    out.loss.backward()
    ref = reference(ids, labels=ids, use_cache=False)
    ref.loss.backward()

    ref_params = dict(reference.named_parameters())
    diffs, largest, experts_without_rows = [], 0.0, 0
    for prefix, layer in expert_parallel_layers(engine.module):
        bank = layer.local_experts
        ref_prefix = prefix  # model.layers.i.mlp: the same place in both models
        local = slice(rank * bank.num_experts, (rank + 1) * bank.num_experts)
        for which in ("w1", "w2"):
            ref_grad = ref_params[f"{ref_prefix}.experts.{which}"].grad.clone()
            dist.all_reduce(ref_grad)  # every rank's tokens reach an expert
            diffs.append((getattr(bank, which).grad - ref_grad[local]).abs().max().item())
            largest = max(largest, ref_grad.abs().max().item())
            experts_without_rows += int((ref_grad[local].flatten(1).abs().sum(1) == 0).sum())
        router_grad = layer.router.weight.grad if hasattr(layer.router, "weight") else None
        if router_grad is not None:
            diffs.append((router_grad - ref_params[f"{ref_prefix}.router.weight"].grad).abs().max().item())
    for name_, param in engine.module.named_parameters():
        if ".mlp." not in name_ or ".shared_mlp." in name_:  # shared experts: replicated, this rank's tokens
            diffs.append((param.grad - ref_params[name_].grad).abs().max().item())
            largest = max(largest, param.grad.abs().max().item())
    return {"logits_max_abs_diff": (out.logits - ref.logits).abs().max().item(),
            "dropped": int(out.dropped_tokens),
            "grad_max_abs_diff": max(diffs), "grad_max_abs": largest, "num_grads": len(diffs),
            "expert_slices_without_rows": experts_without_rows}


if __name__ == "__main__":
    main(sys.argv[1])
