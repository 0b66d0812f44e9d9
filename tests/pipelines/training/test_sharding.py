"""Sharding plans: equal full batches per rank, every sample once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pipelines.training.sharding import EpochOrder, EpochPlan, batch_order, block_count, eval_plan, steps_per_epoch

REPO = Path(__file__).resolve().parents[3]


def read_counts(plan) -> Counter:  # of an evaluation plan
    return Counter((piece.shard, index) for rank in plan for worker in rank for piece in worker
                   for index in range(piece.start, piece.stop))


def block_samples(order: EpochOrder, block: int) -> list[tuple[int, int]]:
    """(shard, index) of each sample of `block`, worked out from the order's definition."""
    samples = []
    for index in range(block * order.batch_size, (block + 1) * order.batch_size):
        window, within = divmod(index, order.window_samples)
        source = window * order.window_samples + order.window_permutation(window)[within]
        [piece] = order.source_ranges(source, source + 1)
        samples.append((piece.shard, piece.start))
    return samples


def plan_counts(order: EpochOrder, plan) -> Counter:
    return Counter(sample for rank in plan for slot in rank for start, stop in slot for block in range(start, stop)
                   for sample in block_samples(order, block))


@pytest.mark.parametrize("shards, world, workers, batch, buffer", [
    ([100] * 14 + [37], 2, 2, 32, 100),  # uneven last shard
    ([1437], 2, 2, 32, 1000),  # one shard, four slots
    ([5, 300, 17, 0, 90], 3, 1, 16, 16),  # wildly uneven, an empty shard, windows of one block
    ([40, 41, 42], 4, 3, 7, 50),  # more slots than shards
    ([64], 2, 0, 32, 1),  # no DataLoader workers, a buffer smaller than a batch
])
def test_train_plan_gives_every_rank_the_same_full_batches(shards, world, workers, batch, buffer):
    steps = steps_per_epoch(sum(shards), world, batch)
    for epoch in range(3):
        order = EpochOrder.of(shards, batch, buffer, seed=7, epoch=epoch)
        plan = EpochPlan.whole_epoch(order.blocks, world, workers).slots()
        for rank in plan:
            assert len(rank) == max(workers, 1)
            assert sum(block_count(slot) for slot in rank) == steps
        counts = plan_counts(order, plan)
        assert max(counts.values()) == 1  # no sample twice in an epoch, across all ranks
        assert sum(shards) - len(counts) < world * batch  # fewer than one global batch left out
        assert all(0 <= index < shards[shard] for shard, index in counts)


def test_the_epochs_order_is_reshuffled_every_epoch_reproducible_and_mixed_within_windows():
    shards = [50] * 8
    first, again, next_epoch = (EpochOrder.of(shards, 10, 40, seed=1, epoch=epoch) for epoch in (0, 0, 1))
    assert [block_samples(first, b) for b in range(first.blocks)] == [block_samples(again, b) for b in range(40)]
    assert [block_samples(first, b) for b in range(40)] != [block_samples(next_epoch, b) for b in range(40)]
    assert first.window_blocks == 4 and first.window_permutation(0) != list(range(40))


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_an_epoch_replanned_for_another_world_size_reads_every_remaining_sample_once(workers):
    """2 ranks read K steps, then the rest is planned for 1 rank (and 1 -> 3, 3 -> 2): together they
    read every sample of the epoch once, but for fewer than one batch per rank of the last plan."""
    shards = [13] * 9 + [5]
    order = EpochOrder.of(shards, 4, 10, seed=3, epoch=2)
    every = plan_counts(order, [[[(0, order.blocks)]]])
    for before, after in ((2, 1), (1, 3), (3, 2)):
        whole = EpochPlan.whole_epoch(order.blocks, before, workers)
        for steps in range(whole.steps + 1):
            rest = whole.replanned(steps, after, workers)
            read = Counter(sample for block in _read_blocks(whole, steps) for sample in block_samples(order, block))
            read += plan_counts(order, rest.slots())
            assert max(read.values()) == 1, (before, after, steps)
            assert set(read) <= set(every) and len(every) - len(read) < after * order.batch_size
            assert rest.blocks_before == steps * before
            assert block_count(rest.remaining) == order.blocks - steps * before


def _read_blocks(plan: EpochPlan, steps: int) -> list[int]:
    """The blocks each rank of `plan` has read after `steps` steps, in the DataLoader's order."""
    read = []
    for rank in plan.slots():
        counts = [block_count(slot) for slot in rank]
        taken = batch_order(counts)[:steps]
        for slot_number, slot in enumerate(rank):
            blocks = [block for start, stop in slot for block in range(start, stop)]
            read += blocks[:taken.count(slot_number)]
    return read


def test_a_plan_with_fewer_blocks_left_than_ranks_gives_every_rank_none():
    plan = EpochPlan([(10, 11)], world_size=2, loader_workers=2)
    assert plan.steps == 0 and plan.slots() == [[[], []], [[], []]]


@pytest.mark.parametrize("shards, world, workers", [([100, 80], 3, 2), ([5], 4, 2), ([7, 0, 9], 2, 0)])
def test_eval_plan_reads_every_sample_exactly_once(shards, world, workers):
    plan = eval_plan(shards, world, workers)
    counts = read_counts(plan)
    assert set(counts.values()) == {1} and len(counts) == sum(shards)
    per_rank = [sum(piece.samples for worker in rank for piece in worker) for rank in plan]
    assert max(per_rank) - min(per_rank) <= 1

