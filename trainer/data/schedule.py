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


class MixtureSchedule:
    """Batches of a weighted mixture as a pure function of the step: sample slot j (the global batch of step k
    holds slots kG .. kG+G-1, rank r its r-th micro batch of them) is drawn from a source chosen by stride
    scheduling, and is that source's n-th draw, which reads position n of the source's own shuffled order
    (epoch n // blocks, a fresh order per epoch).

    Stride scheduling: the normalised weights become integer quanta q_s summing to a period P (at most
    WEIGHT_QUANTUM, reduced by their gcd); within each period source s's n-th draw sits at time (n + 1/2) / q_s,
    and the period's slots take the draws in time order (ties: the lower source). So every period holds exactly
    q_s draws of source s, spread evenly: the share of each source over any run of periods is its quantum
    exactly, and a slot's source and draw number cost O(1) (a table of one period)."""

    def __init__(self, source_blocks: list[int], weights: list[float], micro_batch_size: int, rank: int,
                 world_size: int, seed: int):
        from fractions import Fraction
        from math import gcd

        from trainer.data.config import WEIGHT_QUANTUM

        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        quanta = [round(w / sum(weights) * WEIGHT_QUANTUM) for w in weights]
        divisor = gcd(*quanta)
        self.quanta = np.array([q // divisor for q in quanta], dtype=np.int64)
        self.source_blocks = np.array(source_blocks, dtype=np.int64)
        self.offsets = np.cumsum(np.concatenate([[0], self.source_blocks]))
        self.micro_batch_size, self.rank, self.seed = micro_batch_size, rank, seed
        self.global_batch_size = world_size * micro_batch_size
        draws = sorted((Fraction(2 * n + 1, 2 * int(q)), s, n) for s, q in enumerate(self.quanta) for n in range(q))
        self.period_source = np.array([s for _, s, _ in draws], dtype=np.int64)
        self.period_draw = np.array([n for _, _, n in draws], dtype=np.int64)
        # drawn_before[o, s]: draws of source s in the first o slots of a period
        onehot = np.eye(len(self.quanta), dtype=np.int64)[self.period_source]
        self.drawn_before = np.concatenate([np.zeros((1, len(self.quanta)), np.int64), np.cumsum(onehot, 0)])

    @property
    def period(self) -> int:
        return len(self.period_source)

    def draws(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, its draw number) of each global sample slot."""
        cycle, offset = np.divmod(np.asarray(slots, dtype=np.int64), self.period)
        source = self.period_source[offset]
        return source, cycle * self.quanta[source] + self.period_draw[offset]

    def drawn(self, slots: int) -> np.ndarray:
        """[sources] draws of each source in the first `slots` slots of the run."""
        cycle, offset = divmod(slots, self.period)
        return cycle * self.quanta + self.drawn_before[offset]

    def epochs(self, step: int) -> np.ndarray:
        """[sources] the epoch each source is in after `step` steps (0 until its blocks have all been drawn)."""
        return self.drawn(step * self.global_batch_size) // self.source_blocks

    def indices(self, step: int) -> torch.Tensor:
        """[micro_batch_size] block ids (MixedBlocks numbering) for this rank at optimizer step `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        start = step * self.global_batch_size + self.rank * self.micro_batch_size
        source, draw = self.draws(np.arange(start, start + self.micro_batch_size))
        epoch, position = np.divmod(draw, self.source_blocks[source])
        ids = np.empty(len(source), dtype=np.int64)
        for s, e in sorted(set(zip(source.tolist(), epoch.tolist()))):
            where = (source == s) & (epoch == e)
            order = ShuffledOrder(int(self.source_blocks[s]), seed_from("mixture", self.seed, s, e))
            ids[where] = self.offsets[s] + order(position[where])
        return torch.from_numpy(ids)

    def batch(self, blocks, step: int) -> torch.Tensor:
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
