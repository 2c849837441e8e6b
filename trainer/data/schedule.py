"""Batches as a pure function of the step, in O(1) memory: resume needs only the step number, and no rank
holds a permutation that grows with the corpus (a 10B-token corpus in 128-token blocks would be 600 MB of
int64 order per rank; Megatron-Core memory-maps its shuffle index for that reason, we compute it)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from trainer.errors import UserError

MASK64 = (1 << 64) - 1


def seed_from(*parts: object) -> int:
    """A 63-bit generator seed; hashing keeps (seed, epoch) pairs from colliding as seed + epoch would."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scrambling of uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class ShuffledOrder:
    """A seeded bijection of [0, n), computed per position: a 4-round Feistel network on the smallest even
    number of bits that holds n - 1, with cycle walking (values >= n are encrypted again until they fall in
    range; the domain is < 4n, so ~4 rounds at most on average). Any position's image costs O(1)."""

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        self.n = n
        half = max(1, ((max(n - 1, 1)).bit_length() + 1) // 2)
        self.half, self.mask = np.uint64(half), np.uint64((1 << half) - 1)
        self.keys = [np.uint64(seed_from("feistel", key, r) & MASK64) for r in range(self.ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = self._encrypt(np.asarray(positions, dtype=np.uint64))
        outside = x >= self.n
        while outside.any():
            x[outside] = self._encrypt(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)


class BatchSchedule:
    """Deterministic batches as a pure function of the step: resume needs only the step number.

    Step k of an epoch takes the global batch order[k*G:(k+1)*G] of that epoch's shuffled order (G = world_size *
    micro_batch_size); rank r takes its r-th slice of micro_batch_size, so a step's blocks are the same for any
    world size with the same global batch. An epoch is num_blocks // G steps: the num_blocks % G blocks left at
    its end are skipped rather than joined with the next epoch's, so no batch repeats a block, and since every
    epoch has a fresh order a different remainder is skipped."""

    def __init__(self, num_blocks: int, micro_batch_size: int, rank: int, world_size: int, seed: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if micro_batch_size < 1:
            raise UserError("optim.micro_batch_size", f"must be >= 1, got {micro_batch_size}", "Use e.g. 8")
        self.num_blocks, self.micro_batch_size, self.rank = num_blocks, micro_batch_size, rank
        self.seed = seed
        self.global_batch_size = world_size * micro_batch_size
        if self.global_batch_size > num_blocks:
            raise UserError("optim.micro_batch_size", f"one global batch needs world_size {world_size} x "
                            f"micro_batch_size {micro_batch_size} = {self.global_batch_size} blocks, but the "
                            f"training data has only {num_blocks}", "Lower optim.micro_batch_size, use fewer "
                            "ranks, lower data.seq_len or add training text")
        self.steps_per_epoch = num_blocks // self.global_batch_size

    def order(self, epoch: int) -> ShuffledOrder:
        return ShuffledOrder(self.num_blocks, seed_from("batches", self.seed, epoch))

    def permutation(self, epoch: int) -> torch.Tensor:
        """[num_blocks] block order of `epoch`, the same on every rank (for inspection: training never builds it)."""
        return torch.from_numpy(self.order(epoch)(np.arange(self.num_blocks)))

    def indices(self, step: int) -> torch.Tensor:
        """[micro_batch_size] block indices for this rank at optimizer step `step` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.global_batch_size + self.rank * self.micro_batch_size
        return torch.from_numpy(self.order(epoch)(np.arange(start, start + self.micro_batch_size)))

    def batch(self, blocks, step: int) -> torch.Tensor:
        """[micro_batch_size, seq_len] blocks for this rank at `step`."""
        return blocks[self.indices(step)]


def valid_shard(valid_blocks, rank: int, world_size: int, count: int | None = None) -> torch.Tensor:
    """This rank's contiguous share of the first `count` validation blocks (all for None). Shares differ by at
    most one block and may be empty, so sum losses and token counts across ranks rather than averaging
    per-rank means. Only the share is read (the blocks may be memory-mapped)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    total = len(valid_blocks) if count is None else min(count, len(valid_blocks))
    size, extra = divmod(total, world_size)
    start = rank * size + min(rank, extra)
    return valid_blocks[start:start + size + (rank < extra)]
