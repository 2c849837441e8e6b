"""The exchange step of the dispatcher (models/experts.py `dispatch`) over an expert-parallel group: uneven
all-to-all, no capacity padding, nothing dropped that the router kept.

Shape suffixes: A kept routes sent from this rank (sorted by global slot), R rows received by this rank,
D width, G global slots, L local slots (G / ep_size), P ep ranks.

Global slot g lives on ep-rank g // L (DeepSpeed's layout), so the dispatcher's slot-sorted rows are already
grouped by destination rank. Then:

  1. Exchange the per-slot counts (an all-to-all of G integers): every rank learns how many rows it will
     receive from each source for each of its local slots (counts_from_PL); one host read of the split sizes,
     which the uneven all-to-all needs.
  2. All-to-all the rows with uneven splits (send_splits_P -> recv_splits_P).
  3. Received rows are ordered (source rank, local slot); reorder them to (local slot, source rank) so each
     local slot's rows are contiguous for the grouped GEMM.
  4. After the experts: undo 3 and all-to-all back with the splits swapped.
Backward of each all-to-all is the all-to-all with the splits swapped (`UnevenAllToAll`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.experts import take_rows


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


@dataclass
class Transfer:
    """One exchange's bookkeeping, from `to_experts` to `to_routes`."""

    send_splits: list[int]
    recv_splits: list[int]
    by_slot_R: torch.Tensor


class AllToAllExchange:
    def __init__(self, num_slots: int, ep_size: int, group, timer: CommTimer | None = None):
        self.num_slots, self.ep_size, self.group = num_slots, ep_size, group
        self.timer = timer or CommTimer()

    def to_experts(self, x_AD: torch.Tensor, plan) -> tuple[torch.Tensor, torch.Tensor, Transfer]:
        """Rows of this rank's kept routes (slot-sorted, dropped last) -> the rows of this rank's slots, slot
        by slot, and their counts per local slot."""
        P, L = self.ep_size, self.num_slots // self.ep_size
        tokens_per_slot_G = plan.routes_per_slot_G1[:self.num_slots].contiguous()
        counts_from_PL = torch.empty_like(tokens_per_slot_G)  # step 1
        self.timer.call(dist.all_to_all_single, counts_from_PL, tokens_per_slot_G, None, None, self.group)
        counts_from_PL = counts_from_PL.view(P, L)
        splits = torch.cat([tokens_per_slot_G.view(P, L).sum(1), counts_from_PL.sum(1)]).tolist()  # the host read
        send_splits, recv_splits = splits[:P], splits[P:]
        x_RD = self.timer.call(UnevenAllToAll.apply, x_AD[:sum(send_splits)], send_splits, recv_splits,
                               self.group)  # step 2
        by_slot_R = source_to_slot_order(counts_from_PL, sum(recv_splits))  # step 3
        return take_rows(x_RD, by_slot_R), counts_from_PL.sum(0), Transfer(send_splits, recv_splits, by_slot_R)

    def to_routes(self, y_RD: torch.Tensor, transfer: Transfer) -> torch.Tensor:
        """The experts' outputs back to the ranks that sent the rows, in their sorted order (kept routes)."""
        y_RD = y_RD.new_empty(y_RD.shape).index_copy(0, transfer.by_slot_R, y_RD)  # undo step 3
        return self.timer.call(UnevenAllToAll.apply, y_RD, transfer.recv_splits, transfer.send_splits, self.group)


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
