"""Which samples each reader takes in an epoch: an explicit plan per (rank, DataLoader worker) slot.

The manifest gives every shard's sample count, so the plan is computed, not discovered. A split is
seen as one sequence: its shards concatenated in some order. Each slot receives contiguous ranges
of that sequence, as `ShardRange(shard, start, stop)` pieces of shards, which the input pipeline
streams (reading a shard from its start and skipping to `start`).

Training (`train_plan`): every epoch shuffles the shard order and rotates the sequence by a random
offset (both seeded by seed and epoch), then gives each rank `steps * batch_size` consecutive
samples, where `steps = total // (world_size * batch_size)`. So every rank runs exactly the same
number of full-batch steps whatever the shard sizes (an uneven split hangs DDP), no sample is read
twice within an epoch, across all ranks, and fewer than `world_size * batch_size` samples are left
out, different ones each epoch. A rank's range is cut into whole batches for its DataLoader
workers (they differ by at most one batch; the DataLoader takes from whichever still has data).

We chose this over resampled shards + `with_epoch`: resampling draws shards with replacement, so
with few shards (small data sets, many ranks) ranks see the same samples several times per epoch
while others are never seen, and an epoch is no longer a pass over the data. The price of ranges
is reading past the skipped prefix of a shard that two slots share: at most one shard per slot
boundary, negligible when shards outnumber slots.

Evaluation (`eval_plan`): the sequence in manifest order is cut into `world_size` nearly equal
parts and each part into its workers' parts: every sample exactly once across ranks. Ranks may
run different numbers of batches; evaluation does no collective per batch, only one all-reduce of
the totals at the end, so that cannot hang.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

Plan = list[list[list["ShardRange"]]]  # [rank][loader worker] -> the ranges that slot reads, in order


@dataclass(frozen=True)
class ShardRange:
    shard: int  # index into the split's shard list (manifest order)
    start: int  # first sample within the shard
    stop: int  # one past the last

    @property
    def samples(self) -> int:
        return self.stop - self.start


def steps_per_epoch(total_samples: int, world_size: int, batch_size: int) -> int:
    """Full-batch steps every rank runs in one training epoch."""
    return total_samples // (world_size * batch_size)


def train_plan(shard_samples: Sequence[int], world_size: int, loader_workers: int, batch_size: int,
               seed: int, epoch: int) -> Plan:
    total = sum(shard_samples)
    steps = steps_per_epoch(total, world_size, batch_size)
    if steps == 0:
        raise ValueError(f"{total} training samples are fewer than one batch of {batch_size} per rank "
                         f"for {world_size} ranks")
    rng = random.Random(f"train-plan:{seed}:{epoch}")
    order = rng.sample(range(len(shard_samples)), len(shard_samples))
    offset = rng.randrange(total)
    rank_samples = steps * batch_size
    return [
        [_take(shard_samples, order, offset + rank * rank_samples + start, count)
         for start, count in _split(steps, loader_workers, batch_size)]
        for rank in range(world_size)
    ]


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
