"""Which samples each reader takes in an epoch: an explicit plan of `ShardRange` pieces per (rank,
DataLoader worker) slot, computed from the manifest's counts; training plans give every rank the
same number of full batches, evaluation plans every sample once (docs/design/training.md).
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
