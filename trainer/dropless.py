"""Dropless expert-parallel dispatch: uneven all-to-all, no capacity padding, no dropped tokens.

Shape suffixes: T local tokens, K choices per token, D width, A kept routes sent from this rank, R routes
received by this rank, G global slots, L local slots (G / ep_size), P ep ranks.

DeepSpeed's stock MOELayer pads every slot to one capacity C and moves a [G, C, D] buffer with equal splits:
with skewed routing most of it is padding, and C must be agreed by every rank. Here:

  1. Sort this rank's kept routes by global slot. Slots are laid out rank-major (slot g lives on ep-rank
     g // L), so the sorted rows are already grouped by destination rank.
  2. Exchange the per-slot counts (an all-to-all of G integers) so every rank knows how many rows it will
     receive from each source for each of its local slots: tokens_from_rank_slot_PL.
  3. All-to-all the rows with uneven splits (send_splits_P -> recv_splits_P).
  4. Received rows are ordered (source rank, local slot); reorder them to (local slot, source rank) so each
     local expert runs one matmul over a contiguous slice.
  5. Undo 4, all-to-all back with the splits swapped, weight by the gate, and scatter-add into the tokens.
Backward of each all-to-all is the all-to-all with the splits swapped (`UnevenAllToAll`).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from models.experts import combine_routes, gather_routes, sort_by_slot


class UnevenAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_AD, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x_AD.new_empty((sum(recv_splits), x_AD.shape[1]))
        dist.all_to_all_single(out, x_AD.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((sum(ctx.send_splits), grad_out.shape[1]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad_in, None, None, None


class CommTimer:
    """Seconds spent inside all-to-alls (on CPU/gloo the call returns when the data has arrived)."""

    def __init__(self):
        self.seconds = 0.0

    def call(self, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        self.seconds += time.perf_counter() - start
        return out


def dropless_moe(x_TD: torch.Tensor, slot_TK: torch.Tensor, weight_TK: torch.Tensor, local_experts,
                 num_slots: int, ep_size: int, group, timer: CommTimer | None = None) -> torch.Tensor:
    timer = timer or CommTimer()
    local_slots = num_slots // ep_size
    _, order_A, tokens_per_slot_G = sort_by_slot(slot_TK, num_slots)  # step 1
    x_AD = gather_routes(x_TD, order_A, slot_TK.shape[1])
    if ep_size == 1:  # every expert is here: no collective at all
        counts_L = tokens_per_slot_G.tolist()
        y_AD = run_local_experts(x_AD, counts_L, local_experts)
    else:
        counts_from_PL = torch.empty_like(tokens_per_slot_G)  # step 2
        timer.call(dist.all_to_all_single, counts_from_PL, tokens_per_slot_G, None, None, group)
        counts_from_PL = counts_from_PL.view(ep_size, local_slots)
        send_splits = tokens_per_slot_G.view(ep_size, local_slots).sum(1).tolist()
        recv_splits = counts_from_PL.sum(1).tolist()
        x_RD = timer.call(UnevenAllToAll.apply, x_AD, send_splits, recv_splits, group)  # step 3
        by_slot_R = source_to_slot_order(counts_from_PL, sum(recv_splits))  # step 4
        y_RD = torch.empty_like(x_RD)
        y_RD[by_slot_R] = run_local_experts(x_RD[by_slot_R], counts_from_PL.sum(0).tolist(), local_experts)
        y_AD = timer.call(UnevenAllToAll.apply, y_RD, recv_splits, send_splits, group)  # step 5
    y_AD = y_AD * weight_TK.reshape(-1)[order_A].unsqueeze(1).to(y_AD.dtype)
    return combine_routes(y_AD, order_A, *slot_TK.shape)


def source_to_slot_order(counts_from_PL: torch.Tensor, total_rows: int | None = None) -> torch.Tensor:
    """Indices that reorder rows laid out (source rank, local slot) into (local slot, source rank).
    `total_rows` (the sum of the counts, known on the host from the split sizes) spares a device sync."""
    # Vectorised (no per-piece host read): every row's offset within its (rank, slot) piece, plus where that
    # piece starts in the arriving layout, visited in (slot, rank) order.
    counts_SP = counts_from_PL.t().reshape(-1)  # pieces in the order wanted
    start_PL = torch.cumsum(counts_from_PL.reshape(-1), 0) - counts_from_PL.reshape(-1)
    start_SP = start_PL.view(counts_from_PL.shape).t().reshape(-1)
    piece_R = torch.repeat_interleave(torch.arange(counts_SP.numel(), device=counts_SP.device), counts_SP,
                                      output_size=total_rows)
    first_row = torch.cumsum(counts_SP, 0) - counts_SP
    offset_R = torch.arange(piece_R.numel(), device=counts_SP.device) - first_row[piece_R]
    return start_SP[piece_R] + offset_R


def run_local_experts(x_ND: torch.Tensor, counts_L: list[int], local_experts) -> torch.Tensor:
    outputs = [expert(rows) for expert, rows in zip(local_experts, torch.split(x_ND, counts_L)) if rows.shape[0]]
    if not outputs:
        # Nothing routed here. The result must still depend on x_ND: otherwise autograd skips the backward of
        # the all-to-all that delivered it on this rank only, and the other ranks' matching collective waits
        # for a partner that never comes (gloo: "Received data size doesn't match"). The experts stay in the
        # graph so gradient reduction sees zeros.
        return x_ND * 0.0 + 0.0 * sum(p.sum() for e in local_experts for p in e.parameters())
    return torch.cat(outputs)
