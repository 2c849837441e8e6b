"""Expert parallelism for your own HF `Trainer` or `accelerate launch` script.

accelerate has no expert-parallel axis; DeepSpeed does. A hashmoe model gets one in two lines, and the HF
`Trainer` (or an accelerate script) with a DeepSpeed config does the rest:

    model = shard_experts(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True), ep_size=2)
    args = TrainingArguments(..., deepspeed=deepspeed_config())   # or accelerate's DeepSpeed plugin
    Trainer(model=model, args=args, train_dataset=...).train()

Aux-loss-free balancing (`router_bias_update_rate` > 0) moves the routers' biases after every optimizer step; under
your own Trainer add the callback that does it: `Trainer(..., callbacks=[RouterBiasUpdate()])`.

`shard_experts` swaps each MoE FFN for its expert-parallel twin (`trainer.parallel.expert_parallel.parallelize`, the same module
`hashmoe train` uses): each rank keeps `num_experts / ep_size` experts, tokens travel by all-to-all. DeepSpeed's
engine, which the Trainer builds from the config, marks the expert parameters, reduces their gradients over the
expert-data-parallel group only and saves one file per expert. Without DeepSpeed (plain DDP) the expert gradients
would be averaged over ranks that hold *different* experts, so `shard_experts` is only for DeepSpeed runs.
"""

from __future__ import annotations

import os

import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback

from trainer.parallel.expert_parallel import parallelize


def shard_experts(model: nn.Module, ep_size: int) -> nn.Module:
    """Shard a hashmoe causal LM's experts over groups of `ep_size` consecutive ranks, in place. Call it on every
    rank, under torchrun / `accelerate launch` / `deepspeed`, before building the Trainer; with one process and
    ep_size 1 it changes nothing but the module type."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    num_experts = model.config.num_experts
    if ep_size < 1 or world % ep_size or num_experts % ep_size:
        raise ValueError(f"shard_experts: ep_size={ep_size} must divide the world size ({world} ranks) and "
                         f"num_experts ({num_experts}). Pick a common divisor, or start more ranks.")
    if not model.config.is_moe:
        raise ValueError("shard_experts: the model has no MoE layer (config.moe_layers is empty); train it as is.")
    return parallelize(model, ep_size, rank)


def deepspeed_config(zero_stage: int = 0, bf16: bool = False) -> dict:
    """A DeepSpeed config for HF `TrainingArguments(deepspeed=...)` whose batch, optimizer and clipping values
    come from the TrainingArguments ("auto"). ZeRO 0-2 (DeepSpeed refuses ZeRO-3 for its MoE layers); on CPU use
    stage 0 and fp32, as `hashmoe train` does."""
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"deepspeed_config: zero_stage={zero_stage}; DeepSpeed's MoE layers take ZeRO 0, 1 or 2.")
    return {
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        # torch's AdamW: DeepSpeed's fused CPU Adam would be JIT-compiled at the first start (minutes)
        "optimizer": {"type": "AdamW", "params": {"torch_adam": True, "lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}},
        "steps_per_print": 10 ** 9,
    }


class RouterBiasUpdate(TrainerCallback):
    """After each optimizer step, one aux-loss-free balancing step (DeepSeek-V3) of every switch/topk router with
    `router_bias_update_rate` > 0, from the choices of all ranks: what `hashmoe train` does after engine.step()."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        while not hasattr(model, "update_router_biases") and hasattr(model, "module"):
            model = model.module  # a DeepSpeed or DDP wrapper
        model.update_router_biases(dist.all_reduce if dist.is_initialized() else None)
