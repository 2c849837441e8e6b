"""Expert parallelism on DeepSpeed, applied to a HashMoEForCausalLM from outside (the torchtitan habit: the
model file knows nothing of processes).

Shape suffixes: T tokens, D width, F expert hidden width, S one slot's hidden width, G slots (experts x
segments) of this rank.

`parallelize(model, ep_size, rank)` replaces every `HashMoESparseMLP` by an `ExpertParallelMoE`. Tokens go
through the model's own dispatcher (models/experts.py `dispatch`), with an all-to-all exchange over the
expert-parallel group when it has more than one rank (trainer/parallel/expert_exchange.py), into one grouped bank of
this rank's experts (`LocalExperts`, an `ExpertBank`). The layer subclasses `deepspeed.moe.layer.MoE` for what
DeepSpeed does well: its engine
  - marks the expert parameters (allreduce=False, group_name="ep_size_N") and reduces their gradients over
    the expert-data-parallel group only, and builds the optimizer's expert parameter groups;
  - creates the expert-parallel and expert-data-parallel process groups;
  - writes one checkpoint file per global slot (layer_L_expert_G_mp_rank_00_model_states.pt), from the
    per-slot keys `LocalExperts` presents in its state dict.
DeepSpeed's own MOELayer dispatch (a [G, C, D] buffer padded to one capacity) is not used; it stays as a
benchmark baseline (benchmarks/stock_moe.py).

Multi-hash: each (expert, segment) pair is one DeepSpeed "expert" (slot g = e * segments + m); the segments
of one expert are consecutive, so they live on the same rank. Global slot g lives on ep-rank g // G_local at
local index g % G_local (DeepSpeed's layout); ep groups are runs of consecutive ranks, so a process's ep-rank
is rank % ep_size.
"""

from __future__ import annotations

import contextlib
import io
import re

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import _AllToAll
from torch import nn

from models.experts import ExpertBank, dispatch
from models.modeling_hashmoe import (
    HashMoEForCausalLM,
    HashMoESparseMLP,
    experts_implementation,
    moe_layer_stats,
    with_shared_experts,
)
from models.routing import BaseRouter, RoutingInputs
from trainer.errors import debug_enabled
from trainer.parallel.expert_exchange import AllToAllExchange, CommTimer

SLOT_KEY = re.compile(r"^deepspeed_experts\.(\d+)\.(w[12])$")


class LocalExperts(ExpertBank):
    """This rank's experts of one layer, `num_experts / ep_size` consecutive experts of the model's bank, in the
    place of DeepSpeed's `Experts` (deepspeed_moe.experts). Its state dict holds DeepSpeed's per-slot keys,
    `deepspeed_experts.{local slot}.w1` [C*S, D] and `.w2` [D, S], and loads them back, so the engine's
    checkpoint files (and export, and by-name optimizer state) are the same at every ep_size."""

    def __init__(self, bank: ExpertBank, ep_size: int, ep_rank: int, group_name: str):
        local = bank.num_experts // ep_size
        super().__init__(local, bank.w1.shape[2], bank.expert_size, bank.activation, bank.num_segments, bank.gated)
        if ep_size == 1:  # the model's bank itself: no copy
            self.w1, self.w2 = bank.w1, bank.w2
        else:  # this rank's slice; the full bank goes with the module it replaces
            experts = slice(ep_rank * local, (ep_rank + 1) * local)
            with torch.no_grad():
                self.w1.copy_(bank.w1[experts])
                self.w2.copy_(bank.w2[experts])
        for param in self.parameters():
            param.allreduce = False
            param.group_name = group_name
        self.register_state_dict_post_hook(LocalExperts._per_slot_keys)
        self.register_load_state_dict_pre_hook(LocalExperts._bank_keys)

    @staticmethod
    def _per_slot_keys(module, state_dict, prefix, local_metadata) -> None:
        for name in ("w1", "w2"):
            for slot, piece in enumerate(module.to_slots(name, state_dict.pop(prefix + name)).unbind(0)):
                state_dict[f"{prefix}deepspeed_experts.{slot}.{name}"] = piece

    @staticmethod
    def _bank_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                   error_msgs) -> None:
        pieces = {}
        for key in [k for k in state_dict if k.startswith(prefix + "deepspeed_experts.")]:
            match = SLOT_KEY.match(key[len(prefix):])
            if match is not None:
                pieces[(match[2], int(match[1]))] = state_dict.pop(key)
        for name in ("w1", "w2"):
            slots = [pieces.get((name, g)) for g in range(module.num_slots)]
            if all(piece is not None for piece in slots):
                state_dict[prefix + name] = module.from_slots(name, torch.stack(slots))
            else:  # missing keys are reported as the per-slot names DeepSpeed's files use
                missing_keys += [f"{prefix}deepspeed_experts.{g}.{name}" for g, p in enumerate(slots) if p is None]


class RouterGate(nn.Module):
    """Holds the hashmoe router where DeepSpeed's MOELayer keeps its gate (checkpoint keys
    `...deepspeed_moe.gate.router.*`), and takes the expert-parallel group DeepSpeed hands the gate."""

    def __init__(self, router: nn.Module):
        super().__init__()
        self.router = router
        self.ep_group = None

    def _set_ep_group(self, group) -> None:  # called by deepspeed.initialize
        self.ep_group = group


class ExpertParallelMoE(MoE):
    """A model's MoE FFN, its experts sharded over the expert-parallel group."""

    def __init__(self, sparse_mlp: HashMoESparseMLP, ep_size: int, ep_rank: int):
        bank = sparse_mlp.experts
        # DeepSpeed's MoE builds a MOELayer with its own gate and per-expert copies of a template; both are
        # replaced below, so the template is an empty module.
        super().__init__(hidden_size=bank.w1.shape[2], expert=nn.Identity(), num_experts=bank.num_slots,
                         ep_size=ep_size, k=1, drop_tokens=False, use_rts=False)
        self.config = sparse_mlp.config
        self.num_model_experts = bank.num_experts
        self.comm_timer = CommTimer()
        self.shuffle_tokens = isinstance(sparse_mlp.router, BaseRouter)
        self.deepspeed_moe.gate = RouterGate(sparse_mlp.router)
        self.deepspeed_moe.experts = LocalExperts(bank, ep_size, ep_rank, self.expert_group_name)
        if hasattr(sparse_mlp, "shared_mlp"):  # replicated on every rank, data-parallel like the attention
            self.shared_mlp = sparse_mlp.shared_mlp

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        # DeepSpeed prints "No existing process group found, creating a new group named ..." for every layer of
        # every run (with print, not its logger): kept for --debug only.
        with contextlib.nullcontext() if debug_enabled() else contextlib.redirect_stdout(io.StringIO()):
            super()._create_process_groups(use_data_before_expert_parallel_=use_data_before_expert_parallel_)

    @property
    def router(self) -> nn.Module:
        return self.deepspeed_moe.gate.router

    @property
    def local_experts(self) -> LocalExperts:
        return self.deepspeed_moe.experts

    def forward(self, x_BSD: torch.Tensor, routing: RoutingInputs):
        group = self.deepspeed_moe.ep_group
        shuffle = self.shuffle_tokens and self.training and self.ep_size > 1
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        if shuffle:
            # BASE (Lewis et al. sec. 3.2): first scatter tokens randomly over the workers, so that each
            # worker's balanced assignment sees a random sample rather than its own sequences.
            perm_T = torch.randperm(x_TD.shape[0], device=x_TD.device)
            x_TD = _AllToAll.apply(group, x_TD[perm_T].contiguous())
        routed = self.router(x_TD, routing)
        exchange = None
        if self.ep_size > 1:
            exchange = AllToAllExchange(self.num_experts, self.ep_size, group, self.comm_timer)
        y_TD = dispatch(x_TD, routed.expert_index_TK, routed.expert_weight_TK, self.local_experts, exchange,
                        experts_implementation(self.config))
        if shuffle:
            y_TD = torch.empty_like(y_TD).index_copy_(0, perm_T, _AllToAll.apply(group, y_TD.contiguous()))
        return with_shared_experts(self, x_BSD, y_TD.view_as(x_BSD)), moe_layer_stats(routed, self.num_model_experts)


def parallelize(model: HashMoEForCausalLM, ep_size: int, rank: int) -> HashMoEForCausalLM:
    """Swap each MoE FFN for its expert-parallel twin (in place). Call before deepspeed.initialize."""
    for block in model.model.layers:
        if isinstance(block.mlp, HashMoESparseMLP):
            block.mlp = ExpertParallelMoE(block.mlp, ep_size, rank % ep_size)
    return model


def expert_parallel_layers(model: nn.Module) -> list[tuple[str, ExpertParallelMoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallelMoE)]


def check_expert_groups(model: nn.Module, rank: int) -> None:
    """After deepspeed.initialize: our assumed placement (ep-rank = rank % ep_size) must be DeepSpeed's."""
    from deepspeed.utils import groups

    for name, layer in expert_parallel_layers(model):
        ds_rank = groups._get_expert_parallel_rank(layer.expert_group_name)
        if ds_rank != rank % layer.ep_size:
            raise RuntimeError(f"{name}: DeepSpeed put rank {rank} at expert-parallel rank {ds_rank}, "
                               f"hashmoe assumed {rank % layer.ep_size}")
