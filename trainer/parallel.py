"""Expert parallelism on DeepSpeed, applied to a HashMoEForCausalLM from outside (the torchtitan habit: the
model file knows nothing of processes).

Shape suffixes: B batch, S sequence, T tokens, D width, K choices per token, G slots (experts x segments).

`parallelize(model, ep_size)` replaces every `HashMoESparseMLP` by an `ExpertParallelMoE`, a subclass of
`deepspeed.moe.layer.MoE`, so that DeepSpeed's engine
  - marks the expert parameters (allreduce=False, group_name="ep_size_N") and reduces their gradients over
    the expert-data-parallel group only,
  - writes one checkpoint file per global expert (layer_L_expert_G_mp_rank_00_model_states.pt),
  - builds the optimizer's expert parameter groups itself.
Tokens travel through DeepSpeed's MOELayer: our router is its gate (`RouterGate`), so the stock path is:

  1. gate: our router picks expert(s) per token; the gate turns that into DeepSpeed's routes
     (slot index and position inside the slot's buffer, -1 = dropped) and a capacity C that every rank of
     the expert-parallel group agrees on (all-reduce MAX of the largest slot load: nothing is dropped
     that the router kept).
  2. MOELayer scatters tokens into a [G, C, D] buffer, all-to-all (equal splits) sends slot block r to
     ep-rank r, each local expert runs on its [ep_size, 1, C, D] rows, the reverse all-to-all brings them
     back, and the gate weights combine them.
Multi-hash: each (expert, segment) pair is one DeepSpeed "expert" (slot g = e * segments + m); the segments
of one expert are consecutive, so they live on the same rank.

Global slot g lives on ep-rank g // G_local at local index g % G_local (DeepSpeed's layout); ep groups are
runs of consecutive ranks, so a process's ep-rank is rank % ep_size.
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import _AllToAll
from torch import nn

from models.experts import ACTIVATIONS, assignment_slots
from models.modeling_hashmoe import HashMoEForCausalLM, HashMoESparseMLP, moe_layer_stats
from models.routing import BaseRouter, RoutingInputs
from trainer.dropless import CommTimer, dropless_moe
from trainer.errors import debug_enabled


class ExpertFFN(nn.Module):
    """One slot (an expert, or one multi-hash segment of it) as DeepSpeed's `Experts` list holds it."""

    def __init__(self, hidden_size: int, width: int, activation: str):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(width, hidden_size))
        self.w2 = nn.Parameter(torch.empty(hidden_size, width))
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # DeepSpeed hands each expert [ep_size, 1, C, D]; padding rows are zeros and stay zeros.
        x_ND = x.reshape(-1, x.shape[-1])
        return (self.act(x_ND @ self.w1.t()) @ self.w2.t()).view(x.shape)


def slot_locations(slot_TK: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of every kept route inside its slot's buffer (first choices first, then token order), and
    the number of routes per slot. Dropped routes (-1) get location 0, which DeepSpeed ignores."""
    flat = slot_TK.t().reshape(-1)
    kept = flat >= 0
    slot = torch.where(kept, flat, num_slots)  # dropped routes sort last, into a scratch slot
    order = torch.argsort(slot, stable=True)
    per_slot = torch.bincount(slot, minlength=num_slots + 1)
    first = torch.cumsum(per_slot, 0) - per_slot
    location = torch.empty_like(flat)
    location[order] = torch.arange(flat.numel(), device=flat.device) - first[slot[order]]
    location = torch.where(kept, location, torch.zeros_like(location))
    return location.view(slot_TK.shape[1], slot_TK.shape[0]).t(), per_slot[:num_slots]


class RouterGate(nn.Module):
    """DeepSpeed's gate protocol (0.19.4+) around a hashmoe router. Token ids arrive in `self.routing`, set by
    `ExpertParallelMoE.forward` just before the call (DeepSpeed's gate sees only hidden states)."""

    def __init__(self, router: nn.Module, num_slots: int, num_segments: int):
        super().__init__()
        self.router = router
        self.num_slots = num_slots
        self.num_segments = num_segments
        self.ep_group = None
        self.routing: RoutingInputs | None = None
        self.last_routed = None

    def _set_ep_group(self, group) -> None:  # called by deepspeed.initialize
        self.ep_group = group

    def forward(self, x_TD, used_token=None, sparse_routes=True, use_tutel=False):
        routed = self.router(x_TD, self.routing)
        self.last_routed = routed
        slot_TK = assignment_slots(routed.expert_index_TK, self.num_segments)
        location_TK, tokens_per_slot = slot_locations(slot_TK, self.num_slots)
        capacity = tokens_per_slot.max().clamp(min=1).reshape(1)
        if self.ep_group is not None and dist.get_world_size(group=self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)  # equal buffers on all ranks
        return (routed.aux_loss, int(capacity), self.num_slots, slot_TK.t(), location_TK.t(),
                routed.expert_weight_TK.t().float(), tokens_per_slot)


class ExpertParallelMoE(MoE):
    """A model's MoE FFN, its experts sharded over the expert-parallel group, tokens moved by DeepSpeed."""

    def __init__(self, sparse_mlp: HashMoESparseMLP, ep_size: int, ep_rank: int, activation: str,
                 dispatch: str = "stock"):
        bank = sparse_mlp.experts
        hidden_size = bank.w1.shape[2]
        template = ExpertFFN(hidden_size, bank.segment_size, activation)
        super().__init__(hidden_size=hidden_size, expert=template, num_experts=bank.num_slots, ep_size=ep_size,
                         k=1, drop_tokens=False, use_rts=False)
        self.num_model_experts = bank.num_experts
        self.dispatch = dispatch
        self.comm_timer = CommTimer()
        self.shuffle_tokens = isinstance(sparse_mlp.router, BaseRouter)
        self.deepspeed_moe.gate = RouterGate(sparse_mlp.router, bank.num_slots, bank.num_segments)
        # Experts are deep copies of one template: copy each slot's weights from the model's full bank, so
        # every ep_size starts from the same model.
        local = bank.num_slots // ep_size
        w1_G, w2_G = bank.slot_weights()
        with torch.no_grad():
            for i, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
                expert.w1.copy_(w1_G[ep_rank * local + i])
                expert.w2.copy_(w2_G[ep_rank * local + i])

    def _create_process_groups(self, use_data_before_expert_parallel_: bool = False) -> None:
        # DeepSpeed prints "No existing process group found, creating a new group named ..." for every layer of
        # every run (with print, not its logger): kept for --debug only.
        with contextlib.nullcontext() if debug_enabled() else contextlib.redirect_stdout(io.StringIO()):
            super()._create_process_groups(use_data_before_expert_parallel_=use_data_before_expert_parallel_)

    def forward(self, x_BSD: torch.Tensor, routing: RoutingInputs):
        gate = self.deepspeed_moe.gate
        gate.routing = routing
        group = self.deepspeed_moe.ep_group
        shuffle = self.shuffle_tokens and self.training and self.ep_size > 1
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        if shuffle:
            # BASE (Lewis et al. sec. 3.2): first scatter tokens randomly over the workers, so that each
            # worker's balanced assignment sees a random sample rather than its own sequences.
            perm_T = torch.randperm(x_TD.shape[0], device=x_TD.device)
            x_TD = _AllToAll.apply(group, x_TD[perm_T].contiguous())
        if self.dispatch == "dropless":
            routed = gate.router(x_TD, routing)
            gate.last_routed = routed
            slot_TK = assignment_slots(routed.expert_index_TK, gate.num_segments)
            y_TD = dropless_moe(x_TD, slot_TK, routed.expert_weight_TK, self.deepspeed_moe.experts.deepspeed_experts,
                                gate.num_slots, self.ep_size, group, self.comm_timer)
        else:
            y_TD, _, _ = super().forward(x_TD)
        if shuffle:
            y_TD = torch.empty_like(y_TD).index_copy_(0, perm_T, _AllToAll.apply(group, y_TD.contiguous()))
        return y_TD.view_as(x_BSD), moe_layer_stats(gate.last_routed, self.num_model_experts)


def parallelize(model: HashMoEForCausalLM, ep_size: int, rank: int, dispatch: str = "stock") -> HashMoEForCausalLM:
    """Swap each MoE FFN for its expert-parallel twin (in place). Call before deepspeed.initialize.
    `dispatch`: "stock" (DeepSpeed's MOELayer, padded to a common capacity) or "dropless" (trainer/dropless.py);
    both keep DeepSpeed's groups, parameter marking and checkpoint layout, so checkpoints are interchangeable."""
    for block in model.model.layers:
        if isinstance(block.mlp, HashMoESparseMLP):
            block.mlp = ExpertParallelMoE(block.mlp, ep_size, rank % ep_size, model.config.hidden_act, dispatch)
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
