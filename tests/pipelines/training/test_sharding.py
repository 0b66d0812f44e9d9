"""Sharding plans: equal full batches per rank, every sample once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pipelines.training.sharding import eval_plan, steps_per_epoch, train_plan

REPO = Path(__file__).resolve().parents[3]


def read_counts(plan) -> Counter:
    return Counter((piece.shard, index) for rank in plan for worker in rank for piece in worker
                   for index in range(piece.start, piece.stop))


@pytest.mark.parametrize("shards, world, workers, batch", [
    ([100] * 14 + [37], 2, 2, 32),  # uneven last shard
    ([1437], 2, 2, 32),  # one shard, four slots
    ([5, 300, 17, 0, 90], 3, 1, 16),  # wildly uneven, an empty shard
    ([40, 41, 42], 4, 3, 7),  # more slots than shards
    ([64], 2, 0, 32),  # no DataLoader workers
])
def test_train_plan_gives_every_rank_the_same_full_batches(shards, world, workers, batch):
    steps = steps_per_epoch(sum(shards), world, batch)
    for epoch in range(3):
        plan = train_plan(shards, world, workers, batch, seed=7, epoch=epoch)
        for rank in plan:
            assert len(rank) == max(workers, 1)
            per_worker = [sum(piece.samples for piece in worker) for worker in rank]
            assert all(samples % batch == 0 for samples in per_worker)
            assert sum(per_worker) // batch == steps
        counts = read_counts(plan)
        assert max(counts.values()) == 1  # no sample twice in an epoch, across all ranks
        assert sum(shards) - len(counts) < world * batch  # fewer than one global batch left out
        assert all(0 <= index < shards[shard] for shard, index in counts)


def test_train_plan_reshuffles_every_epoch_and_is_reproducible():
    shards = [50] * 8
    assert train_plan(shards, 2, 2, 10, seed=1, epoch=0) == train_plan(shards, 2, 2, 10, seed=1, epoch=0)
    assert train_plan(shards, 2, 2, 10, seed=1, epoch=0) != train_plan(shards, 2, 2, 10, seed=1, epoch=1)


def test_train_plan_refuses_less_than_a_batch_per_rank():
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_plan([10, 5], 2, 1, 8, seed=0, epoch=0)


@pytest.mark.parametrize("shards, world, workers", [([100, 80], 3, 2), ([5], 4, 2), ([7, 0, 9], 2, 0)])
def test_eval_plan_reads_every_sample_exactly_once(shards, world, workers):
    plan = eval_plan(shards, world, workers)
    counts = read_counts(plan)
    assert set(counts.values()) == {1} and len(counts) == sum(shards)
    per_rank = [sum(piece.samples for worker in rank for piece in worker) for rank in plan]
    assert max(per_rank) - min(per_rank) <= 1

