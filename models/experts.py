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

    def forward(self, x_AD: torch.Tensor, tokens_per_slot: list[int]) -> torch.Tensor:
        """Rows of `x_AD` are grouped by slot, `tokens_per_slot[g]` rows for slot g, in slot order. Called
        through the module (not a method of it), so hooks on the bank (accelerate's offload) see the weights."""
        return GroupedExpertFFN.apply(x_AD, self.w1, self.w2, tokens_per_slot, self.num_segments, self.act)


ACTIVATION_GRADS = {
    F.gelu: lambda grad, pre: torch.ops.aten.gelu_backward(grad, pre),
    F.relu: lambda grad, pre: grad * (pre > 0),
    F.silu: lambda grad, pre: torch.ops.aten.silu_backward(grad, pre),
}


class GroupedExpertFFN(torch.autograd.Function):
    """act(x @ w1_g.T) @ w2_g.T for each slot's contiguous slice of rows, with hand-written backward.

    Why not plain autograd over per-slot views of the bank: the views' backward (unbind or index) builds
    the [E, out, in] weight gradient by stacking E separate gradients (or adding E bank-sized zero tensors),
    a full extra pass over the bank's memory each step: 29% of the fwd+bwd time at E=64, d 512/2048, 2048
    tokens (BENCHMARKS.md, 2026-11-23). Here each matmul writes straight into its slice of one preallocated
    output, pre-activation, input-gradient and weight-gradient buffer, so nothing is concatenated or
    stacked, and the activation runs once over all rows instead of once per slot.
    """

    @staticmethod
    def forward(ctx, x_AD, w1, w2, tokens_per_slot, num_segments, act):
        rows_G = _slot_rows(tokens_per_slot)
        size = w1.shape[1] // num_segments
        pre_AS = x_AD.new_empty(x_AD.shape[0], size)  # S = hidden width of one slot
        for slot, rows in rows_G:
            expert, segment = divmod(slot, num_segments)
            torch.mm(x_AD[rows], w1[expert, segment * size:(segment + 1) * size].t(), out=pre_AS[rows])
        h_AS = act(pre_AS)
        y_AD = torch.empty_like(x_AD)  # the slots' rows cover all A rows
        for slot, rows in rows_G:
            expert, segment = divmod(slot, num_segments)
            torch.mm(h_AS[rows], w2[expert, :, segment * size:(segment + 1) * size].t(), out=y_AD[rows])
        ctx.save_for_backward(x_AD, w1, w2, pre_AS, h_AS)
        ctx.rows_G, ctx.num_segments, ctx.act = rows_G, num_segments, act
        return y_AD

    @staticmethod
    def backward(ctx, grad_y_AD):
        x_AD, w1, w2, pre_AS, h_AS = ctx.saved_tensors
        rows_G, num_segments = ctx.rows_G, ctx.num_segments
        size = pre_AS.shape[1]
        grad_y_AD = grad_y_AD.contiguous()
        # Slots that got no rows have zero weight gradient; fill only when some slot is empty.
        every_slot_used = len(rows_G) == w1.shape[0] * num_segments
        new_grad = torch.empty_like if every_slot_used else torch.zeros_like
        grad_w1, grad_w2 = new_grad(w1), new_grad(w2)
        grad_h_AS = torch.empty_like(h_AS)
        for slot, rows in rows_G:
            expert, segment = divmod(slot, num_segments)
            hidden = slice(segment * size, (segment + 1) * size)
            torch.mm(grad_y_AD[rows], w2[expert, :, hidden], out=grad_h_AS[rows])
            _mm_into(grad_w2[expert, :, hidden], grad_y_AD[rows].t(), h_AS[rows])
        grad_pre_AS = ACTIVATION_GRADS[ctx.act](grad_h_AS, pre_AS)
        grad_x_AD = torch.empty_like(x_AD)
        for slot, rows in rows_G:
            expert, segment = divmod(slot, num_segments)
            hidden = slice(segment * size, (segment + 1) * size)
            torch.mm(grad_pre_AS[rows], w1[expert, hidden], out=grad_x_AD[rows])
            _mm_into(grad_w1[expert, hidden], grad_pre_AS[rows].t(), x_AD[rows])
        return grad_x_AD, grad_w1, grad_w2, None, None, None


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


def sort_by_slot(slot_TK: torch.Tensor, num_slots: int):
    """Order the kept (token, k) assignments by slot (stable, so token order is kept within a slot).

    Returns (token_A, order_A, tokens_per_slot_G): token_A[i] is the token of the i-th sorted assignment,
    order_A its flat index into [T*K] (to pick its weight).
    """
    flat_slot = slot_TK.reshape(-1)
    kept = (flat_slot >= 0).nonzero().squeeze(1)
    order_A = kept[torch.argsort(flat_slot[kept], stable=True)]
    token_A = order_A // slot_TK.shape[1]
    tokens_per_slot_G = torch.bincount(flat_slot[kept], minlength=num_slots)
    return token_A, order_A, tokens_per_slot_G


def dispatch_local(x_TD: torch.Tensor, expert_index_TK: torch.Tensor, expert_weight_TK: torch.Tensor,
                   bank: ExpertBank) -> torch.Tensor:
    """y_t = sum_k weight[t, k] * expert_{index[t, k]}(x_t), all experts local; dropped tokens give 0."""
    slot_TK = assignment_slots(expert_index_TK, bank.num_segments)
    token_A, order_A, tokens_per_slot_G = sort_by_slot(slot_TK, bank.num_slots)
    y_AD = bank(gather_routes(x_TD, order_A, slot_TK.shape[1]), tokens_per_slot_G.tolist())
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
