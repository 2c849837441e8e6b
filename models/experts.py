"""One expert module (E FFNs stored as 3-D tensors) and the one token dispatcher.

Shape suffixes: T tokens, D model width, F expert hidden width, S one slot's hidden width (F / segments),
E experts, K assignments per token, A routes (T*K, dropped ones sorted last), G slots (experts x segments),
R rows the experts of this process receive.

The dispatcher, in the shape torchtitan and Megatron-Core use:

  route -> permute (sort every route by slot once: order, tokens per slot, dropped routes last)
        -> exchange (to the process that holds the slot; nothing when every expert is here)
        -> experts (one grouped GEMM per projection over the slot-sorted rows)
        -> exchange back -> un-permute and combine (weighted sum over each token's K routes).

The local path is the expert-parallel path with a group of one: `dispatch(..., exchange=None)`. Expert
parallelism (trainer/parallel/expert_exchange.py) passes an exchange over its process group; the model file knows
nothing of processes. The GShard one-hot [T, E, capacity] tensor is never built: memory stays O(T*K*D).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}

# transformers' names (config._experts_implementation, from_pretrained(experts_implementation=...)): "grouped_mm"
# runs torch._grouped_mm where its kernel takes the tensors, "eager" a loop of one matmul per slot, "batched_mm"
# one batched matmul over every route with its slot's weights gathered per route (`batched_expert_ffn`: for
# inference, not training); unset, the bank picks per device (`use_grouped_mm`).
EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


class ExpertBank(nn.Module):
    """`num_experts` FFNs, weights laid out [E, out, in] as in HF MoE models: `w1` the input projection, `w2` the
    output projection. Plain: act(x w1^T) w2^T with w1 [E, F, D]. Gated (GLU; SwiGLU with silu, as in Llama,
    Qwen3-MoE, Mixtral, DeepSeek): act(x Wg^T) * (x Wu^T) w2^T with w1 = [Wg; Wu] stacked [E, 2F, D], gate rows
    first: transformers' `gate_up_proj` layout, so the two input projections are one GEMM.

    With `num_segments > 1` (multi-hash, Roller et al. 2021 sec. 3) expert e's hidden units are split into
    segments; "slot" g = e * num_segments + m is segment m of expert e, and a token's K = num_segments
    assignments each use one segment, so their summed outputs equal one FFN over the concatenated hidden.
    """

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int, activation: str = "gelu",
                 num_segments: int = 1, gated: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.num_segments = num_segments
        self.expert_size = expert_size
        self.segment_size = expert_size // num_segments
        self.activation = activation
        self.gated = gated
        self.input_projections = 2 if gated else 1
        self.w1 = nn.Parameter(torch.empty(num_experts, self.input_projections * expert_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))

    def shaped_like(self, num_experts: int) -> ExpertBank:
        """A bank of `num_experts` experts shaped as these (weights uninitialised)."""
        return ExpertBank(num_experts, self.w1.shape[2], self.expert_size, self.activation, self.num_segments,
                          self.gated)

    @property
    def num_slots(self) -> int:
        return self.num_experts * self.num_segments

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w2, std=out_std)

    def forward_slot(self, slot: int, x_ND: torch.Tensor) -> torch.Tensor:
        """One slot's FFN on rows x_ND, written plainly: the reference the tests hold the dispatcher to."""
        w1_CSD, w2_DS = self.to_slots("w1", self.w1)[slot], self.to_slots("w2", self.w2)[slot]
        return glu_or_act(x_ND @ w1_CSD.t(), self.activation, self.gated) @ w2_DS.t()

    def to_slots(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like parameter `name` ("w1" [E, C*F, D], C = 1 plain or 2 gated, or "w2" [E, D, F])
        with slots leading: [G, C*S, D] (gate rows then up rows of the slot's segment) or [G, D, S]. Without
        segments both are views; with segments a gated w1 and any w2 are gathered into slot order (a copy;
        autograd scatters its gradient back)."""
        G, S, H, C = self.num_slots, self.segment_size, self.num_segments, self.input_projections
        if H == 1:
            return tensor
        E = tensor.shape[0]
        if name == "w1":
            D = tensor.shape[2]
            if C == 1:
                return tensor.reshape(G, S, D)
            return tensor.reshape(E, C, H, S, D).transpose(1, 2).reshape(G, C * S, D)
        D = tensor.shape[1]
        return tensor.reshape(E, D, H, S).transpose(1, 2).reshape(G, D, S)

    def from_slots(self, name: str, slots: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_slots`."""
        E, S, H, C = self.num_experts, self.segment_size, self.num_segments, self.input_projections
        if H == 1:
            return slots
        if name == "w1":
            D = slots.shape[2]
            return slots.reshape(E, H, C, S, D).transpose(1, 2).reshape(E, C * H * S, D)
        D = slots.shape[1]
        return slots.reshape(E, H, D, S).transpose(1, 2).reshape(E, D, H * S)

    def slot_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's weights, slots leading: w1 [G, C*S, D] and w2 [G, D, S]."""
        return self.to_slots("w1", self.w1), self.to_slots("w2", self.w2)

    def forward(self, x_AD: torch.Tensor, tokens_per_slot_G: torch.Tensor,
                implementation: str | None = None) -> torch.Tensor:
        """Rows of `x_AD` are grouped by slot, `tokens_per_slot_G[g]` rows for slot g, in slot order; rows past
        the last slot's (dropped routes, sorted last) give 0. Called through the module (not a method of it), so
        hooks on the bank (accelerate's offload) see the weights."""
        w1_GSD, w2_GDS = self.slot_weights()
        if implementation == "batched_mm":
            return batched_expert_ffn(x_AD, w1_GSD, w2_GDS, tokens_per_slot_G[:self.num_slots], self.activation,
                                      self.gated)
        grouped = use_grouped_mm(implementation, x_AD, w1_GSD, w2_GDS)
        return expert_ffn(x_AD, w1_GSD, w2_GDS, tokens_per_slot_G[:self.num_slots], self.activation, grouped,
                          self.gated)


def batched_expert_ffn(x_AD: torch.Tensor, w1_GSD: torch.Tensor, w2_GDS: torch.Tensor,
                       tokens_per_slot_G: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """transformers' "batched_mm": every kept row times its own slot's weights, gathered per row, in one batched
    matmul per projection (autograd differentiates it). It holds a copy of the weights per route ([A, C*S, D] and
    [A, D, S]), so it fits inference on a few tokens (decoding), where one launch beats a loop over experts; in
    training the grouped GEMM or the per-slot loop (`expert_ffn`) computes the same without the copies."""
    kept = int(tokens_per_slot_G.sum())
    slots = torch.arange(tokens_per_slot_G.shape[0], device=x_AD.device)
    slot_A = torch.repeat_interleave(slots, tokens_per_slot_G.to(x_AD.device), output_size=kept)
    pre_AC = torch.bmm(w1_GSD[slot_A], x_AD[:kept, :, None]).squeeze(-1)
    y_AD = torch.bmm(w2_GDS[slot_A], glu_or_act(pre_AC, activation, gated)[:, :, None]).squeeze(-1)
    dropped = x_AD.shape[0] - kept  # rows past the last slot's give 0
    return torch.cat([y_AD, y_AD.new_zeros(dropped, y_AD.shape[1])]) if dropped else y_AD


def glu_or_act(pre_NC: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """The FFN's hidden units from its input projection: act(pre), or for a GLU act(gate) * up with
    pre = [gate | up] (Shazeer 2020, "GLU Variants Improve Transformer")."""
    if not gated:
        return ACTIVATIONS[activation](pre_NC)
    gate_NS, up_NS = pre_NC.chunk(2, dim=-1)
    return ACTIVATIONS[activation](gate_NS) * up_NS


def glu_or_act_backward(grad_h_NS: torch.Tensor, pre_NC: torch.Tensor, activation: str,
                        gated: bool) -> torch.Tensor:
    """d loss / d pre from d loss / d h, for `glu_or_act`."""
    if not gated:
        return ACTIVATION_GRADS[activation](grad_h_NS, pre_NC)
    gate_NS, up_NS = pre_NC.chunk(2, dim=-1)
    grad_gate_NS = ACTIVATION_GRADS[activation](grad_h_NS * up_NS, gate_NS)
    return torch.cat([grad_gate_NS, grad_h_NS * ACTIVATIONS[activation](gate_NS)], dim=-1)


def use_grouped_mm(implementation: str | None, *tensors: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs these tensors. "eager": never. "grouped_mm": where its kernel takes them
    (fp32/bf16/fp16 on CPU or CUDA SM80+, every stride and base address a multiple of 16 bytes). None (the
    default): on CUDA where it takes them; on CPU never, since torch's CPU _grouped_mm is a loop of matmuls no
    faster than ours, and its weight-gradient form is 1.4x slower (BENCHMARKS.md, 2026-12-01)."""
    if implementation not in (None, *EXPERTS_IMPLEMENTATIONS):
        raise ValueError(f"experts_implementation={implementation!r} is not offered by hashmoe's expert bank: "
                         f"use one of {', '.join(EXPERTS_IMPLEMENTATIONS)}.")
    x = tensors[0]
    if implementation in ("eager", "batched_mm") or not hasattr(torch, "_grouped_mm") or \
            (implementation is None and not x.is_cuda):
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.device.type not in ("cpu", "cuda"):
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    return all(t.data_ptr() % 16 == 0 and all((s * t.element_size()) % 16 == 0 for s in t.stride() if s != 1)
               for t in tensors)


# Op names are per module: an exported model folder's copy of this file (loaded with trust_remote_code, as
# transformers_modules.<hash>.experts) can live in the same process as hashmoe's own, and op names are global.
_OP_PREFIX = re.sub(r"\W", "_", __name__) + "_"

ACTIVATION_GRADS = {
    "gelu": lambda grad, pre: torch.ops.aten.gelu_backward(grad, pre),
    "relu": lambda grad, pre: grad * (pre > 0),
    "silu": lambda grad, pre: torch.ops.aten.silu_backward(grad, pre),
}


# act(x @ w1_g.T) @ w2_g.T (or its GLU form) for each slot's contiguous slice of rows, as a custom op with a
# hand-written backward.
#
# Why a custom op: the slice sizes are data (tokens per slot). To torch.compile and torch.export the op is one
# node whose output has the input's shape, so a model graph with MoE layers has no data-dependent shapes and
# compiles with fullgraph=True (torch's own meta kernel for _grouped_mm is bf16-only).
#
# Why a hand-written backward: each weight gradient is one grouped GEMM (or, in the loop, one matmul per slot
# written into its slice of one preallocated [G, out, in] buffer) rather than autograd stacking G separate
# gradients: that stacking was 29% of the fwd+bwd time at E=64 (BENCHMARKS.md, 2026-11-23).
#
# Rows past the last slot (dropped routes) read 0. grouped_mm leaves them unwritten, so its outputs are masked;
# the loop zero-fills instead.
@torch.library.custom_op(f"hashmoe::{_OP_PREFIX}expert_ffn_forward", mutates_args=())
def expert_ffn_forward(x_AD: torch.Tensor, w1_GSD: torch.Tensor, w2_GDS: torch.Tensor, tokens_per_slot_G: torch.Tensor,
                       activation: str, grouped: bool,
                       gated: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_AD, pre-activation [A, C*S], hidden [A, S]) of every row; the last two are kept for the backward."""
    if grouped:
        offs_G = _group_ends(tokens_per_slot_G)
        pre_AS = _zero_rows_past(torch._grouped_mm(x_AD, w1_GSD.transpose(-2, -1), offs=offs_G), offs_G)
        h_AS = glu_or_act(pre_AS, activation, gated)
        y_AD = _zero_rows_past(torch._grouped_mm(h_AS, w2_GDS.transpose(-2, -1), offs=offs_G), offs_G)
        return y_AD, pre_AS, h_AS
    rows_G = _slot_rows(tokens_per_slot_G.tolist())
    new_rows = torch.zeros if _has_dropped(rows_G, x_AD) else torch.empty
    pre_AS = new_rows(x_AD.shape[0], w1_GSD.shape[1], dtype=x_AD.dtype, device=x_AD.device)
    for slot, rows in rows_G:
        torch.mm(x_AD[rows], w1_GSD[slot].t(), out=pre_AS[rows])
    h_AS = glu_or_act(pre_AS, activation, gated)  # act(0) = 0 for every activation offered
    y_AD = new_rows(x_AD.shape, dtype=x_AD.dtype, device=x_AD.device)
    for slot, rows in rows_G:
        torch.mm(h_AS[rows], w2_GDS[slot].t(), out=y_AD[rows])
    return y_AD, pre_AS, h_AS


@expert_ffn_forward.register_fake
def _(x_AD, w1_GSD, w2_GDS, tokens_per_slot_G, activation, grouped, gated=False):
    rows = x_AD.shape[0]
    return x_AD.new_empty(x_AD.shape), x_AD.new_empty(rows, w1_GSD.shape[1]), x_AD.new_empty(rows, w2_GDS.shape[2])


@torch.library.custom_op(f"hashmoe::{_OP_PREFIX}expert_ffn_backward", mutates_args=())
def expert_ffn_backward(grad_y_AD: torch.Tensor, x_AD: torch.Tensor, w1_GSD: torch.Tensor, w2_GDS: torch.Tensor,
                        pre_AS: torch.Tensor, h_AS: torch.Tensor, tokens_per_slot_G: torch.Tensor, activation: str,
                        grouped: bool, gated: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_y_AD = grad_y_AD.contiguous()
    if grouped:
        offs_G = _group_ends(tokens_per_slot_G)
        grad_h_AS = torch._grouped_mm(grad_y_AD, w2_GDS, offs=offs_G)
        grad_w2 = torch._grouped_mm(grad_y_AD.t(), h_AS, offs=offs_G)  # rows past the last group are not read
        grad_pre_AS = glu_or_act_backward(grad_h_AS, pre_AS, activation, gated)
        grad_x_AD = _zero_rows_past(torch._grouped_mm(grad_pre_AS, w1_GSD, offs=offs_G), offs_G)
        grad_w1 = torch._grouped_mm(grad_pre_AS.t(), x_AD, offs=offs_G)
        return grad_x_AD, grad_w1, grad_w2
    rows_G = _slot_rows(tokens_per_slot_G.tolist())
    # Slots that got no rows have zero weight gradient; fill only when some slot is empty.
    new_grad = torch.empty_like if len(rows_G) == w1_GSD.shape[0] else torch.zeros_like
    grad_w1, grad_w2 = new_grad(w1_GSD), new_grad(w2_GDS)
    new_rows = torch.zeros_like if _has_dropped(rows_G, x_AD) else torch.empty_like
    grad_h_AS = new_rows(h_AS)  # rows past the last slot must read 0: act'(0) * 0 in the GLU form too
    for slot, rows in rows_G:
        torch.mm(grad_y_AD[rows], w2_GDS[slot], out=grad_h_AS[rows])
        torch.mm(grad_y_AD[rows].t(), h_AS[rows], out=grad_w2[slot])
    grad_pre_AS = glu_or_act_backward(grad_h_AS, pre_AS, activation, gated)
    grad_x_AD = new_rows(x_AD)
    for slot, rows in rows_G:
        torch.mm(grad_pre_AS[rows], w1_GSD[slot], out=grad_x_AD[rows])
        torch.mm(grad_pre_AS[rows].t(), x_AD[rows], out=grad_w1[slot])
    return grad_x_AD, grad_w1, grad_w2


@expert_ffn_backward.register_fake
def _(grad_y_AD, x_AD, w1_GSD, w2_GDS, pre_AS, h_AS, tokens_per_slot_G, activation, grouped, gated=False):
    return torch.empty_like(x_AD), torch.empty_like(w1_GSD), torch.empty_like(w2_GDS)


class _ExpertFFN(torch.autograd.Function):
    """The two ops as one differentiable function returning y only: were the pre-activation and activation
    outputs of a registered autograd, the engine would zero-fill a gradient for each ([A, S], two bank-sized
    passes per step) although nothing uses them."""

    @staticmethod
    def forward(ctx, x_AD, w1_GSD, w2_GDS, tokens_per_slot_G, activation, grouped, gated):
        y_AD, pre_AS, h_AS = expert_ffn_forward(x_AD, w1_GSD, w2_GDS, tokens_per_slot_G, activation, grouped,
                                                gated)
        ctx.save_for_backward(x_AD, w1_GSD, w2_GDS, pre_AS, h_AS, tokens_per_slot_G)
        ctx.activation, ctx.grouped, ctx.gated = activation, grouped, gated
        return y_AD

    @staticmethod
    def backward(ctx, grad_y_AD):
        x_AD, w1_GSD, w2_GDS, pre_AS, h_AS, tokens_per_slot_G = ctx.saved_tensors
        grads = expert_ffn_backward(grad_y_AD, x_AD, w1_GSD, w2_GDS, pre_AS, h_AS, tokens_per_slot_G,
                                    ctx.activation, ctx.grouped, ctx.gated)
        return (*grads, None, None, None, None)


def expert_ffn(x_AD: torch.Tensor, w1_GSD: torch.Tensor, w2_GDS: torch.Tensor, tokens_per_slot_G: torch.Tensor,
               activation: str, grouped: bool, gated: bool = False) -> torch.Tensor:
    """act(x @ w1_g.T) @ w2_g.T (or the GLU form, `glu_or_act`) of each slot's rows (rows past the last slot
    give 0), differentiable."""
    return _ExpertFFN.apply(x_AD, w1_GSD, w2_GDS, tokens_per_slot_G, activation, grouped, gated)


def _group_ends(tokens_per_slot_G: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(tokens_per_slot_G, 0, dtype=torch.int32)


def _zero_rows_past(rows_AN: torch.Tensor, offs_G: torch.Tensor) -> torch.Tensor:
    """Zero (in place) the rows after the last group, which grouped_mm leaves unwritten."""
    if rows_AN.device.type == "cpu":  # reading a CPU tensor costs nothing; on a GPU it would stall the stream
        rows_AN[int(offs_G[-1]) if offs_G.numel() else 0:].zero_()
    else:
        kept_A = torch.arange(rows_AN.shape[0], device=rows_AN.device) < offs_G[-1:]
        rows_AN.masked_fill_(~kept_A.unsqueeze(1), 0)
    return rows_AN


def _has_dropped(rows_G: list[tuple[int, slice]], x_AD: torch.Tensor) -> bool:
    """Whether rows past the last used slot exist (dropped routes, sorted last)."""
    return (rows_G[-1][1].stop if rows_G else 0) < x_AD.shape[0]


def _slot_rows(tokens_per_slot: list[int]) -> list[tuple[int, slice]]:
    """(slot, row slice) of every slot that has rows."""
    rows, start = [], 0
    for slot, count in enumerate(tokens_per_slot):
        if count:
            rows.append((slot, slice(start, start + count)))
        start += count
    return rows


# ---- the dispatcher -------------------------------------------------------------------------------------
def assignment_slots(expert_index_TK: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Map expert choices to bank slots; -1 (dropped) stays -1. With segments, column k is segment k."""
    if num_segments == 1:
        return expert_index_TK
    segment_TK = torch.arange(num_segments, device=expert_index_TK.device).expand_as(expert_index_TK)
    return torch.where(expert_index_TK >= 0, expert_index_TK * num_segments + segment_TK, -1)


def sort_by_slot(slot_N: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routes in the order given, stably sorted by slot; -1 (dropped) sorts last, into a scratch slot. Returns
    (order_N, routes_per_slot_G1): order_N[i] is the index of the i-th sorted route, routes_per_slot_G1[G] the
    dropped ones. Shapes depend on N only, never on the routing: traceable."""
    slot = torch.where(slot_N >= 0, slot_N, num_slots)
    order_N = torch.argsort(slot, stable=True)
    routes_per_slot_G1 = torch.zeros(num_slots + 1, dtype=torch.long, device=slot.device)
    return order_N, routes_per_slot_G1.scatter_add_(0, slot, torch.ones_like(slot))


def positions_in_slot(slot_N: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The one definition of "the n-th route of its slot" (Switch/GShard capacity): position_N[n] is route n's
    place among the routes of its slot, in the order given."""
    order_N, routes_per_slot_G1 = sort_by_slot(slot_N, num_slots)
    first_of_slot = torch.cumsum(routes_per_slot_G1, 0) - routes_per_slot_G1
    slot_sorted = torch.where(slot_N >= 0, slot_N, num_slots)[order_N]
    position_N = torch.empty_like(slot_N)
    position_N[order_N] = torch.arange(slot_N.numel(), device=slot_N.device) - first_of_slot[slot_sorted]
    return position_N


@dataclass
class RoutePlan:
    """The permutation of one dispatch, computed once: every (token, k) route sorted by slot (token order kept
    within a slot), dropped routes last. order_A[i] is the flat [T*K] index of the i-th sorted route."""

    order_A: torch.Tensor
    routes_per_slot_G1: torch.Tensor  # [G + 1]: routes per slot, then the dropped ones
    num_tokens: int
    K: int

    @classmethod
    def build(cls, slot_TK: torch.Tensor, num_slots: int) -> RoutePlan:
        return cls(*sort_by_slot(slot_TK.reshape(-1), num_slots), *slot_TK.shape)

    def permute(self, x_TD: torch.Tensor) -> torch.Tensor:
        """x_AD: the row of every sorted route; route i is (token order_A[i] // K, choice order_A[i] % K)."""
        x_ND = x_TD if self.K == 1 else x_TD.repeat_interleave(self.K, dim=0)  # row t*K + k: distinct per route
        return take_rows(x_ND, self.order_A)

    def combine(self, y_AD: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        """y_TD[t] = sum_k weight[t, k] * y of route (t, k). y_AD holds the first y_AD.shape[0] sorted routes;
        the rest (dropped) give 0. index_copy into the [T*K] route layout (each route once: no scatter-add)."""
        order_A = self.order_A[:y_AD.shape[0]]
        y_AD = y_AD * weight_TK.reshape(-1)[order_A].unsqueeze(1).to(y_AD.dtype)
        y_ND = y_AD.new_zeros((self.num_tokens * self.K, y_AD.shape[1])).index_copy(0, order_A, y_AD)
        return y_ND if self.K == 1 else y_ND.view(self.num_tokens, self.K, -1).sum(1)


def dispatch(x_TD: torch.Tensor, expert_index_TK: torch.Tensor, expert_weight_TK: torch.Tensor, bank: ExpertBank,
             exchange=None, implementation: str | None = None) -> torch.Tensor:
    """y_t = sum_k weight[t, k] * expert_{index[t, k]}(x_t); dropped routes (-1) give 0.

    `exchange` None: every slot is in `bank`. Otherwise `bank` holds this process's slots and `exchange`
    (trainer/parallel/expert_exchange.py) moves the sorted rows to the processes holding their slots and back:
    `exchange.to_experts(x_AD, plan) -> (x_RD, tokens_per_local_slot, transfer)` and
    `exchange.to_routes(y_RD, transfer) -> y of the kept routes, in sorted order`."""
    num_slots = bank.num_slots if exchange is None else exchange.num_slots
    plan = RoutePlan.build(assignment_slots(expert_index_TK, bank.num_segments), num_slots)
    x_AD = plan.permute(x_TD)
    if exchange is None:
        return plan.combine(bank(x_AD, plan.routes_per_slot_G1, implementation), expert_weight_TK)
    x_RD, tokens_per_local_slot, transfer = exchange.to_experts(x_AD, plan)
    y_RD = bank(x_RD, tokens_per_local_slot, implementation)
    return plan.combine(exchange.to_routes(y_RD, transfer), expert_weight_TK)


class _TakeRows(torch.autograd.Function):
    """rows_AD = x_ND[index_A] for *distinct* indices. Autograd's own backward for indexing must assume repeats
    and scatter-adds (serial on CPU); with distinct indices the backward is a plain copy into place (into an
    unfilled buffer when the indices are a permutation: every row is written)."""

    @staticmethod
    def forward(ctx, x_ND, index_A):
        ctx.save_for_backward(index_A)
        ctx.num_rows = x_ND.shape[0]
        return x_ND.index_select(0, index_A)

    @staticmethod
    def backward(ctx, grad_AD):
        (index_A,) = ctx.saved_tensors
        new_rows = grad_AD.new_empty if index_A.numel() == ctx.num_rows else grad_AD.new_zeros
        return new_rows((ctx.num_rows, grad_AD.shape[1])).index_copy_(0, index_A, grad_AD), None


def take_rows(x_ND: torch.Tensor, index_A: torch.Tensor) -> torch.Tensor:
    """x_ND[index_A] for distinct indices (a permutation, or a subset), with a copy-into-place backward."""
    return _TakeRows.apply(x_ND, index_A)


def expert_init_std(initializer_range: float, num_hidden_layers: int) -> tuple[float, float]:
    """GPT-2 init: N(0, r) for input projections, N(0, r / sqrt(2L)) for projections into the residual."""
    return initializer_range, initializer_range / math.sqrt(2 * num_hidden_layers)
