"""Which samples each reader takes in an epoch. Training: the epoch's order of samples, which does
not depend on how many ranks and DataLoader workers read it (`EpochOrder`: blocks of one batch,
shuffled within windows), and plans that give each (rank, loader worker) slot runs of those blocks,
every rank the same number; a plan can be cut where a checkpoint was taken and the rest planned for
another layout. Evaluation: every sample once, as `ShardRange` pieces (docs/design/training.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

Plan = list[list[list["ShardRange"]]]  # [rank][loader worker] -> the ranges that slot reads, in order
Blocks = list[tuple[int, int]]  # half-open runs of block numbers, in the order they are read
BlockPlan = list[list[Blocks]]  # [rank][loader worker] -> the blocks that slot reads, in order


@dataclass(frozen=True)
class ShardRange:
    shard: int  # index into the split's shard list (manifest order)
    start: int  # first sample within the shard
    stop: int  # one past the last

    @property
    def samples(self) -> int:
        return self.stop - self.start


def steps_per_epoch(total_samples: int, world_size: int, batch_size: int) -> int:
    """Full-batch steps every rank runs in one whole training epoch."""
    return total_samples // (world_size * batch_size)


@dataclass(frozen=True)
class EpochOrder:
    """The order of one training epoch's samples. Positions run through the split's shards, taken in
    a shuffled cyclic order from a random offset; they are cut into windows of `window_blocks` blocks
    of `batch_size` samples, and each window is permuted. Block `b` is samples `b * batch_size` to
    `(b + 1) * batch_size` of the permuted order; the samples after the last full block are not read."""

    shard_samples: tuple[int, ...]
    batch_size: int
    window_blocks: int
    seed: int
    epoch: int

    @classmethod
    def of(cls, shard_samples: Sequence[int], batch_size: int, shuffle_buffer: int, seed: int,
           epoch: int) -> EpochOrder:
        """Windows hold as many whole blocks as fit in `shuffle_buffer` samples (at least one)."""
        return cls(tuple(shard_samples), batch_size, max(1, shuffle_buffer // batch_size), seed, epoch)

    @property
    def total(self) -> int:
        return sum(self.shard_samples)

    @property
    def blocks(self) -> int:
        return self.total // self.batch_size

    @property
    def window_samples(self) -> int:
        return self.window_blocks * self.batch_size

    @cached_property
    def _start(self) -> tuple[list[int], int]:
        rng = random.Random(f"train-plan:{self.seed}:{self.epoch}")
        order = rng.sample(range(len(self.shard_samples)), len(self.shard_samples))
        return order, rng.randrange(max(self.total, 1))

    def window_permutation(self, window: int) -> list[int]:
        """Where each sample of window `window` comes from, as offsets within the window."""
        size = min(self.window_samples, self.total - window * self.window_samples)
        return random.Random(f"train-window:{self.seed}:{self.epoch}:{window}").sample(range(size), size)

    def source_ranges(self, start: int, stop: int) -> list[ShardRange]:
        """The shard ranges holding positions `start` to `stop` (before the windows' permutations)."""
        order, offset = self._start
        return _take(self.shard_samples, order, offset + start, stop - start)

    def sample_seed(self, index: int) -> str:
        """The seed of the augmentation of the epoch's `index`-th sample (in the permuted order)."""
        return f"train-sample:{self.seed}:{self.epoch}:{index}"


@dataclass(frozen=True)
class EpochPlan:
    """How an epoch under way is read: the blocks it had left when the plan was made (all of them for
    a new epoch), by `world_size` ranks with `loader_workers` DataLoader workers each."""

    remaining: Blocks
    world_size: int
    loader_workers: int
    blocks_before: int = 0  # blocks of the epoch read before this plan

    @classmethod
    def whole_epoch(cls, blocks: int, world_size: int, loader_workers: int) -> EpochPlan:
        return cls([(0, blocks)], world_size, loader_workers)

    @classmethod
    def from_state(cls, state: dict) -> EpochPlan:
        return cls([tuple(run) for run in state["remaining"]], state["world_size"], state["loader_workers"],
                   state["blocks_before"])

    def state(self) -> dict:
        return {"remaining": [list(run) for run in self.remaining], "world_size": self.world_size,
                "loader_workers": self.loader_workers, "blocks_before": self.blocks_before}

    @property
    def steps(self) -> int:
        return block_count(self.remaining) // self.world_size

    def slots(self) -> BlockPlan:
        """Each rank a contiguous part of the same number of blocks, `steps` (the last
        `len % world_size` blocks are left out), cut into nearly equal, contiguous runs per DataLoader
        worker."""
        return [[_slice(self.remaining, rank * self.steps + start, count)
                 for start, count in _split(self.steps, self.loader_workers, 1)]
                for rank in range(self.world_size)]

    def blocks_read(self, steps: int) -> int:
        """Blocks of the epoch read once every rank has run `steps` steps of this plan."""
        return self.blocks_before + steps * self.world_size

    def replanned(self, steps: int, world_size: int, loader_workers: int) -> EpochPlan:
        """The blocks not read after `steps` steps of this plan (those it left out included), planned
        for another layout."""
        used = self.steps * self.world_size
        left_out = _slice(self.remaining, used, block_count(self.remaining) - used)
        return EpochPlan(_merged(remaining_after(self.slots(), steps) + left_out), world_size, loader_workers,
                         self.blocks_read(steps))


def remaining_after(plan: BlockPlan, steps: int) -> Blocks:
    """The blocks of `plan` not yet read once every rank has run `steps` steps: each slot's runs
    after the batches the DataLoader has taken from it (`batch_order`)."""
    left: Blocks = []
    for rank in plan:
        order = batch_order([block_count(slot) for slot in rank])[:steps]
        for slot_number, slot in enumerate(rank):
            left += blocks_after(slot, order.count(slot_number))
    return _merged(left)


def block_count(blocks: Blocks) -> int:
    return sum(stop - start for start, stop in blocks)


def blocks_after(blocks: Blocks, done: int) -> Blocks:
    """`blocks` without the first `done` blocks."""
    return _slice(blocks, done, block_count(blocks) - done)


def batch_order(slot_batches: Sequence[int]) -> list[int]:
    """The slot (DataLoader worker) of each batch of a rank, in the order a DataLoader delivers them:
    round-robin from worker 0, workers that have finished left out."""
    order, left = [], list(slot_batches)
    while any(left):
        for slot, count in enumerate(left):
            if count:
                order.append(slot)
                left[slot] -= 1
    return order


def _slice(blocks: Blocks, start: int, count: int) -> Blocks:
    """`count` blocks of `blocks` from its `start`-th one."""
    taken: Blocks = []
    for first, stop in blocks:
        size = stop - first
        if start >= size:
            start -= size
            continue
        take = min(size - start, count)
        if take > 0:
            taken.append((first + start, first + start + take))
        count -= take
        start = 0
    return taken


def _merged(blocks: Blocks) -> Blocks:
    merged: Blocks = []
    for start, stop in blocks:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return merged


def eval_plan(shard_samples: Sequence[int], world_size: int, loader_workers: int) -> Plan:
    total = sum(shard_samples)
    order = list(range(len(shard_samples)))
    plan = []
    for rank in range(world_size):
        rank_start = total * rank // world_size
        rank_samples = total * (rank + 1) // world_size - rank_start
        plan.append([_take(shard_samples, order, rank_start + start, count)
                     for start, count in _split(rank_samples, loader_workers, 1)])
    return plan


def _split(units: int, parts: int, unit_size: int) -> list[tuple[int, int]]:
    """`units` cut into `max(parts, 1)` contiguous, nearly equal parts: (first sample, samples)."""
    parts = max(parts, 1)
    bounds = [units * part // parts for part in range(parts + 1)]
    return [(bounds[part] * unit_size, (bounds[part + 1] - bounds[part]) * unit_size) for part in range(parts)]


def _take(shard_samples: Sequence[int], order: Sequence[int], position: int, count: int) -> list[ShardRange]:
    """`count` samples from `position` of the cyclic sequence of shards in `order`, as ranges."""
    if count == 0:
        return []
    ranges: list[ShardRange] = []
    position %= sum(shard_samples)
    index = 0
    while position >= shard_samples[order[index]]:
        position -= shard_samples[order[index]]
        index += 1
    while count > 0:
        shard = order[index % len(order)]
        take = min(shard_samples[shard] - position, count)
        if take > 0:
            ranges.append(ShardRange(shard, position, position + take))
        count -= take
        position = 0
        index += 1
    return ranges
