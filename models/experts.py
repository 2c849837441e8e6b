"""Expert bank (E FFNs stored as 3-D tensors) and the sort-based local dispatch.

Shape suffixes: T tokens, D model width, F expert hidden width, E experts, K assignments per token,
A kept assignments (T*K minus the dropped ones), G slots (E experts x segments), N rows of one slice.

Dispatch never builds the GShard one-hot [T, E, capacity] tensor: tokens are sorted by the slot they go
to, each expert runs one matmul over its contiguous slice, and the outputs are scattered back. Memory
stays O(T*K*D). The same bank `forward` serves the expert-parallel path, where the sorted slices
arrive from other ranks (trainer/parallel.py).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class ExpertBank(nn.Module):
    """`num_experts` two-layer FFNs, weights laid out [E, out, in] as in HF MoE models.

    With `num_segments > 1` (multi-hash, Roller et al. 2021 sec. 3) expert e's hidden units are split into
    segments; "slot" g = e * num_segments + m is segment m of expert e, and a token's K = num_segments
    assignments each use one segment, so their summed outputs equal one FFN over the concatenated hidden.
    """

    def __init__(self, num_experts: int, hidden_size: int, expert_size: int, activation: str = "gelu",
                 num_segments: int = 1):
        super().__init__()
        self.num_experts = num_experts
        self.num_segments = num_segments
        self.segment_size = expert_size // num_segments
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.w1 = nn.Parameter(torch.empty(num_experts, expert_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size))

    @property
    def num_slots(self) -> int:
        return self.num_experts * self.num_segments

    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w2, std=out_std)

    def forward_slot(self, slot: int, x_ND: torch.Tensor) -> torch.Tensor:
        expert, segment = divmod(slot, self.num_segments)
        hidden = slice(segment * self.segment_size, (segment + 1) * self.segment_size)
        h_NF = self.act(x_ND @ self.w1[expert, hidden].t())
        return h_NF @ self.w2[expert, :, hidden].t()

    def slot_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Views of every slot's weights, in slot order: w1 [F/segments, D] and w2 [D, F/segments]."""
        w1_E, w2_E = self.w1.unbind(0), self.w2.unbind(0)
        if self.num_segments == 1:
            return list(w1_E), list(w2_E)
        size = self.segment_size
        hidden = [slice(m * size, (m + 1) * size) for m in range(self.num_segments)]
        return [w1[h] for w1 in w1_E for h in hidden], [w2[:, h] for w2 in w2_E for h in hidden]

    def forward(self, x_AD: torch.Tensor, tokens_per_slot_G: torch.Tensor) -> torch.Tensor:
        """Rows of `x_AD` are grouped by slot, `tokens_per_slot_G[g]` rows for slot g, in slot order; rows past
        the last slot's (dropped routes, sorted last) give 0. Called through the module (not a method of it), so
        hooks on the bank (accelerate's offload) see the weights."""
        return expert_ffn(x_AD, self.w1, self.w2, tokens_per_slot_G, self.num_segments, self.activation)[0]


# Op names are per module: an exported model folder's copy of this file (loaded with trust_remote_code, as
# transformers_modules.<hash>.experts) can live in the same process as hashmoe's own, and op names are global.
_OP_PREFIX = re.sub(r"\W", "_", __name__) + "_"

ACTIVATION_GRADS = {
    "gelu": lambda grad, pre: torch.ops.aten.gelu_backward(grad, pre),
    "relu": lambda grad, pre: grad * (pre > 0),
    "silu": lambda grad, pre: torch.ops.aten.silu_backward(grad, pre),
}


# act(x @ w1_g.T) @ w2_g.T for each slot's contiguous slice of rows, as a custom op with a hand-written backward.
#
# Why a custom op: the slice sizes are data (tokens per slot). Inside the op they are read as Python ints; to
# torch.compile and torch.export the op is one node whose output has the input's shape, so a model graph with MoE
# layers has no data-dependent shapes and compiles with fullgraph=True.
#
# Why a hand-written backward rather than autograd over per-slot views of the bank: the views' backward (unbind or
# index) builds the [E, out, in] weight gradient by stacking E separate gradients (or adding E bank-sized zero
# tensors), a full extra pass over the bank's memory each step: 29% of the fwd+bwd time at E=64, d 512/2048, 2048
# tokens (BENCHMARKS.md, 2026-11-23). Here each matmul writes straight into its slice of one preallocated output,
# pre-activation, input-gradient and weight-gradient buffer, and the activation runs once over all rows.
@torch.library.custom_op(f"hashmoe::{_OP_PREFIX}expert_ffn", mutates_args=())
def expert_ffn(x_AD: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, tokens_per_slot_G: torch.Tensor,
               num_segments: int, activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_AD, pre-activation, activation) of every row; the last two are kept for the backward."""
    rows_G = _slot_rows(tokens_per_slot_G.tolist()[:w1.shape[0] * num_segments])
    size = w1.shape[1] // num_segments
    new_rows = torch.zeros if _has_dropped(rows_G, x_AD) else torch.empty  # dropped rows must read 0
    pre_AS = new_rows(x_AD.shape[0], size, dtype=x_AD.dtype, device=x_AD.device)  # S = one slot's hidden width
    for slot, rows in rows_G:
        expert, segment = divmod(slot, num_segments)
        torch.mm(x_AD[rows], w1[expert, segment * size:(segment + 1) * size].t(), out=pre_AS[rows])
    h_AS = ACTIVATIONS[activation](pre_AS)  # act(0) = 0 for every activation offered
    y_AD = new_rows(x_AD.shape, dtype=x_AD.dtype, device=x_AD.device)
    for slot, rows in rows_G:
        expert, segment = divmod(slot, num_segments)
        torch.mm(h_AS[rows], w2[expert, :, segment * size:(segment + 1) * size].t(), out=y_AD[rows])
    return y_AD, pre_AS, h_AS


@expert_ffn.register_fake
def _(x_AD, w1, w2, tokens_per_slot_G, num_segments, activation):
    size = w1.shape[1] // num_segments
    return x_AD.new_empty(x_AD.shape), x_AD.new_empty(x_AD.shape[0], size), x_AD.new_empty(x_AD.shape[0], size)


@torch.library.custom_op(f"hashmoe::{_OP_PREFIX}expert_ffn_backward", mutates_args=())
def expert_ffn_backward(grad_y_AD: torch.Tensor, x_AD: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                        pre_AS: torch.Tensor, h_AS: torch.Tensor, tokens_per_slot_G: torch.Tensor, num_segments: int,
                        activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows_G = _slot_rows(tokens_per_slot_G.tolist()[:w1.shape[0] * num_segments])
    size = pre_AS.shape[1]
    grad_y_AD = grad_y_AD.contiguous()
    # Slots that got no rows have zero weight gradient; fill only when some slot is empty.
    every_slot_used = len(rows_G) == w1.shape[0] * num_segments
    new_grad = torch.empty_like if every_slot_used else torch.zeros_like
    grad_w1, grad_w2 = new_grad(w1), new_grad(w2)
    dropped = _has_dropped(rows_G, x_AD)
    grad_h_AS = torch.zeros_like(h_AS) if dropped else torch.empty_like(h_AS)
    for slot, rows in rows_G:
        expert, segment = divmod(slot, num_segments)
        hidden = slice(segment * size, (segment + 1) * size)
        torch.mm(grad_y_AD[rows], w2[expert, :, hidden], out=grad_h_AS[rows])
        _mm_into(grad_w2[expert, :, hidden], grad_y_AD[rows].t(), h_AS[rows])
    grad_pre_AS = ACTIVATION_GRADS[activation](grad_h_AS, pre_AS)
    grad_x_AD = torch.zeros_like(x_AD) if dropped else torch.empty_like(x_AD)
    for slot, rows in rows_G:
        expert, segment = divmod(slot, num_segments)
        hidden = slice(segment * size, (segment + 1) * size)
        torch.mm(grad_pre_AS[rows], w1[expert, hidden], out=grad_x_AD[rows])
        _mm_into(grad_w1[expert, hidden], grad_pre_AS[rows].t(), x_AD[rows])
    return grad_x_AD, grad_w1, grad_w2


@expert_ffn_backward.register_fake
def _(grad_y_AD, x_AD, w1, w2, pre_AS, h_AS, tokens_per_slot_G, num_segments, activation):
    return torch.empty_like(x_AD), torch.empty_like(w1), torch.empty_like(w2)


def _expert_ffn_setup_context(ctx, inputs, output):
    x_AD, w1, w2, tokens_per_slot_G, num_segments, activation = inputs
    _, pre_AS, h_AS = output
    ctx.save_for_backward(x_AD, w1, w2, pre_AS, h_AS, tokens_per_slot_G)
    ctx.num_segments, ctx.activation = num_segments, activation


def _expert_ffn_backward(ctx, grad_y_AD, grad_pre, grad_h):
    x_AD, w1, w2, pre_AS, h_AS, tokens_per_slot_G = ctx.saved_tensors
    grads = expert_ffn_backward(grad_y_AD, x_AD, w1, w2, pre_AS, h_AS, tokens_per_slot_G, ctx.num_segments,
                                ctx.activation)
    return (*grads, None, None, None)


expert_ffn.register_autograd(_expert_ffn_backward, setup_context=_expert_ffn_setup_context)


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


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if out.is_contiguous():
        torch.mm(a, b, out=out)
    else:  # a segment's columns of w2's gradient
        out.copy_(a @ b)


def assignment_slots(expert_index_TK: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Map expert choices to bank slots; -1 (dropped) stays -1. With segments, column k is segment k."""
    if num_segments == 1:
        return expert_index_TK
    segment_TK = torch.arange(num_segments, device=expert_index_TK.device).expand_as(expert_index_TK)
    return torch.where(expert_index_TK >= 0, expert_index_TK * num_segments + segment_TK, -1)


def sort_routes(slot_TK: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (token, k) route ordered by slot, dropped routes (-1) last; stable, so token order is kept within a
    slot. Returns (order_A, routes_per_slot_G1): order_A[i] is the flat [T*K] index of the i-th sorted route,
    routes_per_slot_G1[G] the dropped ones. Shapes depend on T*K only, never on the routing: traceable."""
    flat = slot_TK.reshape(-1)
    slot = torch.where(flat >= 0, flat, num_slots)
    order_A = torch.argsort(slot, stable=True)
    routes_per_slot_G1 = torch.zeros(num_slots + 1, dtype=torch.long, device=flat.device)
    return order_A, routes_per_slot_G1.scatter_add_(0, slot, torch.ones_like(slot))


def sort_by_slot(slot_TK: torch.Tensor, num_slots: int):
    """`sort_routes` without the dropped routes (for the exchange of the expert-parallel path, which sends kept
    rows only). Returns (token_A, order_A, tokens_per_slot_G); token_A[i] is the token of the i-th kept route."""
    order_A, routes_per_slot_G1 = sort_routes(slot_TK, num_slots)
    kept = order_A.shape[0] - int(routes_per_slot_G1[-1])
    order_A = order_A[:kept]
    return order_A // slot_TK.shape[1], order_A, routes_per_slot_G1[:num_slots]


def dispatch_local(x_TD: torch.Tensor, expert_index_TK: torch.Tensor, expert_weight_TK: torch.Tensor,
                   bank: ExpertBank) -> torch.Tensor:
    """y_t = sum_k weight[t, k] * expert_{index[t, k]}(x_t), all experts local; dropped routes give 0."""
    slot_TK = assignment_slots(expert_index_TK, bank.num_segments)
    order_A, routes_per_slot_G1 = sort_routes(slot_TK, bank.num_slots)
    y_AD = bank(gather_routes(x_TD, order_A, slot_TK.shape[1]), routes_per_slot_G1)
    y_AD = y_AD * expert_weight_TK.reshape(-1)[order_A].unsqueeze(1).to(y_AD.dtype)
    return combine_routes(y_AD, order_A, *slot_TK.shape)


class _TakeRows(torch.autograd.Function):
    """rows_AD = x_ND[index_A] for *distinct* indices. Autograd's own backward for indexing must assume repeats
    and scatter-adds (serial on CPU); with distinct indices the backward is a plain copy into place."""

    @staticmethod
    def forward(ctx, x_ND, index_A):
        ctx.save_for_backward(index_A)
        ctx.num_rows = x_ND.shape[0]
        return x_ND.index_select(0, index_A)

    @staticmethod
    def backward(ctx, grad_AD):
        (index_A,) = ctx.saved_tensors
        grad_ND = grad_AD.new_zeros((ctx.num_rows, grad_AD.shape[1]))
        return grad_ND.index_copy_(0, index_A, grad_AD), None


def gather_routes(x_TD: torch.Tensor, order_A: torch.Tensor, K: int) -> torch.Tensor:
    """Rows for the sorted routes: route i is (token order_A[i] // K, choice order_A[i] % K)."""
    x_ND = x_TD if K == 1 else x_TD.repeat_interleave(K, dim=0)  # row t*K + k = token t, distinct per route
    return _TakeRows.apply(x_ND, order_A)


def combine_routes(y_AD: torch.Tensor, order_A: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """y_TD[t] = sum_k y of route (t, k); dropped routes give 0. index_copy into the [T*K] route layout (each
    route once: no scatter-add), then a sum over k."""
    y_ND = y_AD.new_zeros((T * K, y_AD.shape[1])).index_copy(0, order_A, y_AD)
    return y_ND if K == 1 else y_ND.view(T, K, -1).sum(1)


def expert_init_std(initializer_range: float, num_hidden_layers: int) -> tuple[float, float]:
    """GPT-2 init: N(0, r) for input projections, N(0, r / sqrt(2L)) for projections into the residual."""
    return initializer_range, initializer_range / math.sqrt(2 * num_hidden_layers)
