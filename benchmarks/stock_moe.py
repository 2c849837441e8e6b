"""The baseline the dispatcher is measured against: DeepSpeed's stock MOELayer dispatch (every slot's buffer
padded to one capacity C, a [G, C, D] tensor moved by equal-split all-to-all, one module per expert) carrying
the *same* hashmoe routing. A benchmark piece only: training never takes this path.

The gate speaks DeepSpeed's gate protocol (0.19.4+): (aux loss, capacity, number of experts, expert index per
choice [K, T], location of each route in its slot's buffer [K, T], gate weights [K, T], tokens per slot).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

from models.experts import ACTIVATIONS, assignment_slots, positions_in_slot
from models.modeling_hashmoe import HashMoESparseMLP, moe_layer_stats
from models.routing import RoutingInputs, count_per_expert


class ExpertFFN(nn.Module):
    """One slot (an expert, or one multi-hash segment of it) as DeepSpeed's `Experts` list holds it."""

    def __init__(self, hidden_size: int, width: int, activation: str):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(width, hidden_size))
        self.w2 = nn.Parameter(torch.empty(hidden_size, width))
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # DeepSpeed hands each expert [ep_size, 1, C, D]; padding rows are zeros and stay zeros. Its dispatch
        # runs in the gate's fp32: back to the weights' dtype (bf16 on a GPU).
        x_ND = x.reshape(-1, x.shape[-1]).to(self.w1.dtype)
        return (self.act(x_ND @ self.w1.t()) @ self.w2.t()).view(x.shape)


class StockGate(nn.Module):
    def __init__(self, router: nn.Module, num_slots: int, num_segments: int):
        super().__init__()
        self.router, self.num_slots, self.num_segments = router, num_slots, num_segments
        self.ep_group = None
        self.routing: RoutingInputs | None = None
        self.last_routed = None

    def _set_ep_group(self, group) -> None:
        self.ep_group = group

    def forward(self, x_TD, used_token=None, sparse_routes=True, use_tutel=False):
        routed = self.router(x_TD, self.routing)
        self.last_routed = routed
        slot_TK = assignment_slots(routed.expert_index_TK, self.num_segments)
        # first choices first, then token order: DeepSpeed's buffer order
        location_KT = positions_in_slot(slot_TK.t().reshape(-1), self.num_slots).view(slot_TK.shape[1], -1)
        location_KT = torch.where(slot_TK.t() >= 0, location_KT, torch.zeros_like(location_KT))
        tokens_per_slot = count_per_expert(slot_TK, self.num_slots)
        capacity = tokens_per_slot.max().clamp(min=1).reshape(1)
        if self.ep_group is not None and dist.get_world_size(group=self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)  # equal buffers on all ranks
        return (routed.aux_loss, int(capacity), self.num_slots, slot_TK.t(), location_KT,
                routed.expert_weight_TK.t().float(), tokens_per_slot)


class StockMoE(MoE):
    """A model's MoE FFN through DeepSpeed's MOELayer; the experts are per-slot copies of the model's bank."""

    def __init__(self, sparse_mlp: HashMoESparseMLP, activation: str):
        bank = sparse_mlp.experts
        super().__init__(hidden_size=bank.w1.shape[2], expert=ExpertFFN(bank.w1.shape[2], bank.segment_size,
                                                                         activation),
                         num_experts=bank.num_slots, ep_size=1, k=1, drop_tokens=False, use_rts=False)
        self.num_model_experts = bank.num_experts
        self.deepspeed_moe.gate = StockGate(sparse_mlp.router, bank.num_slots, bank.num_segments)
        w1_GSD, w2_GDS = bank.slot_weights()
        with torch.no_grad():
            for slot, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
                expert.w1.copy_(w1_GSD[slot])
                expert.w2.copy_(w2_GDS[slot])

    def forward(self, x_BSD: torch.Tensor, routing: RoutingInputs):
        gate = self.deepspeed_moe.gate
        gate.routing = routing
        y_TD, _, _ = super().forward(x_BSD.reshape(-1, x_BSD.shape[-1]))
        return y_TD.view_as(x_BSD), moe_layer_stats(gate.last_routed, self.num_model_experts)
