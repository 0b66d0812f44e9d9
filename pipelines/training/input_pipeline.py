"""The input pipeline of one training worker: a prepared dataset's shards streamed with webdataset,
read as the `sharding` plan assigns them to this rank and its DataLoader workers (training: blocks
of the epoch's order, put in order within their shuffle windows), decoded and transformed with PIL,
each sample's augmentation seeded by its place in the epoch, batched as uint8 tensors; bad samples
skipped (and counted) or fatal, as configured; an epoch resumed at any batch exactly as it would
have gone on (docs/design/training.md).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import deque
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable, Iterator

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.dataset import BadSample, OnBadSample, PreparedDataset, decode_sample, shard_name_of
from infra.errors import UserError
from pipelines.training.sharding import (Blocks, EpochOrder, EpochPlan, ShardRange, batch_order, block_count,
                                         blocks_after, eval_plan)

logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image, random.Random], torch.Tensor]
Keyed = Iterator[tuple[str, dict]]  # raw samples, each with the seed of its augmentation


@dataclass(frozen=True)
class SplitShards:
    """One split of a prepared dataset, as read by webdataset: shard URLs, their sample counts and
    the number of classes labels must fall within."""

    urls: list[str]
    samples: list[int]
    num_classes: int

    @classmethod
    def of(cls, dataset: PreparedDataset, split: str) -> SplitShards:
        return cls(dataset.shard_urls(split), dataset.shard_samples(split), len(dataset.class_names))

    @property
    def total(self) -> int:
        return sum(self.samples)


@dataclass(frozen=True)
class ReaderLayout:
    """Where this process sits: its rank among `world_size` and its DataLoader worker count."""

    rank: int
    world_size: int
    loader_workers: int
    pin_memory: bool = False


class EpochStream(IterableDataset):
    """The training batches of one rank: each DataLoader worker reads its slot's blocks of the epoch's
    order, from batch `start_batch` of the rank on (a resumed epoch). Skipped samples are replaced by
    repeats, so that every batch is full; `skipped` holds each slot's count, in shared memory so that
    the DataLoader's worker processes can write it."""

    def __init__(self, urls: list[str], order: EpochOrder, slots: list[Blocks], transform: Transform, *,
                 num_classes: int, on_bad_sample: OnBadSample, start_batch: int = 0):
        super().__init__()
        self.urls, self.order, self.slots, self.transform = urls, order, slots, transform
        self.num_classes, self.on_bad_sample = num_classes, on_bad_sample
        self.skipped = torch.zeros(len(slots), dtype=torch.int64).share_memory_()
        self.start_batch = start_batch

    def slot_batches(self) -> list[int]:
        return [block_count(slot) for slot in self.slots]

    def describe_ranges(self) -> str:
        """What this rank reads, e.g. `480 samples in 60 batches: blocks 0-29 60-89 of 240`."""
        runs = " ".join(f"{start}-{stop - 1}" for slot in self.slots for start, stop in slot)
        batches = sum(self.slot_batches())
        return f"{batches * self.order.batch_size} samples in {batches} batches: blocks {runs} of {self.order.blocks}"

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info().id if get_worker_info() else 0
        slot = self.slots[worker]
        done = batch_order(self.slot_batches())[:self.start_batch].count(worker)
        blocks = blocks_after(slot, done)
        planned = block_count(blocks) * self.order.batch_size
        rng = random.Random(f"refill:{self.order.seed}:{self.order.epoch}:{blocks[:1]}")
        return iter(wds.DataPipeline(
            partial(read_blocks, self.urls, self.order, blocks, self.on_bad_sample),
            partial(decode_counted, self.num_classes, self.on_bad_sample, planned, self.skipped[worker:worker + 1]),
            partial(refill, planned, self.order.batch_size, rng),
            partial(augment, self.transform),
            wds.batched(self.order.batch_size, collation_fn=collate, partial=False),
        ))


class EvalStream(IterableDataset):
    """The evaluation batches of one rank: each DataLoader worker reads its slot of the plan, in order
    (the last batch may be short); `skipped` as in `EpochStream`."""

    def __init__(self, urls: list[str], slots: list[list[ShardRange]], transform: Transform, batch_size: int, *,
                 num_classes: int, on_bad_sample: OnBadSample):
        super().__init__()
        self.urls, self.slots, self.transform, self.batch_size = urls, slots, transform, batch_size
        self.num_classes, self.on_bad_sample = num_classes, on_bad_sample
        self.skipped = torch.zeros(len(slots), dtype=torch.int64).share_memory_()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info().id if get_worker_info() else 0
        planned = sum(piece.samples for piece in self.slots[worker])
        return iter(wds.DataPipeline(
            partial(_unseeded, read_ranges(self.urls, self.slots[worker], self.on_bad_sample)),
            partial(decode_counted, self.num_classes, self.on_bad_sample, planned, self.skipped[worker:worker + 1]),
            partial(augment, self.transform),
            wds.batched(self.batch_size, collation_fn=collate, partial=True),
        ))


def _unseeded(samples: Iterator[tuple[int, dict]]) -> Keyed:
    return (("", sample) for _, sample in samples)


def read_blocks(urls: list[str], order: EpochOrder, blocks: Blocks, on_bad_sample: OnBadSample) -> Keyed:
    """The samples of `blocks` in the epoch's order, each with its augmentation seed. Each run of blocks
    streams the shard ranges of the windows it touches once, holding the samples of one window that
    it needs until the window is complete."""
    window_samples, batch = order.window_samples, order.batch_size
    for start, stop in blocks:
        first, last = start * batch, stop * batch  # epoch indices this run yields
        windows = range(first // window_samples, (last - 1) // window_samples + 1)
        span_start = windows[0] * window_samples
        span_stop = min((windows[-1] + 1) * window_samples, order.total)
        wanted: dict[int, int] = {}  # source position -> epoch index, for the window being read
        held: dict[int, dict] = {}  # epoch index -> sample
        window = None
        ranges = order.source_ranges(span_start, span_stop)
        for offset, sample in read_ranges(urls, ranges, on_bad_sample):
            position = span_start + offset
            if position // window_samples != window:
                yield from _in_order(held, order)
                window = position // window_samples
                base = window * window_samples
                wanted = {base + source: base + index for index, source in enumerate(order.window_permutation(window))
                          if first <= base + index < last}
            if position in wanted:
                held[wanted[position]] = sample
        yield from _in_order(held, order)


def _in_order(held: dict[int, dict], order: EpochOrder) -> Keyed:
    for index in sorted(held):
        yield order.sample_seed(index), held[index]
    held.clear()


def read_ranges(urls: list[str], ranges: list[ShardRange], on_bad_sample: OnBadSample) -> Iterator[tuple[int, dict]]:
    """Raw webdataset samples of each range, in order (a shard is read from its start), with their
    offset in the ranges' sequence. A shard that breaks off (truncated, corrupt tar) is a bad sample
    for the rest of the range."""
    offset = 0
    for piece in ranges:
        failures: list[Exception] = []  # webdataset's handler: record the error, stop this shard
        samples = wds.tarfile_samples([{"url": urls[piece.shard]}], handler=failures.append)
        read = 0
        for sample in itertools.islice(samples, piece.start, piece.stop):
            yield offset + read, sample
            read += 1
        offset += piece.samples
        samples.close()
        if failures and isinstance(failures[0], UserError):  # the endpoint failed, not the shard
            raise failures[0]
        if read < piece.samples:
            reason = _describe(failures[0]) if failures else "the shard ends early"
            bad_sample(BadSample(f"{shard_name_of(urls[piece.shard])}: samples {piece.start + read} to "
                                 f"{piece.stop - 1} unreadable ({reason})"), on_bad_sample)


def _describe(error: Exception) -> str:
    """`Type: message` of an error from webdataset's tar reading (without the ` @ <stream>` it appends)."""
    message = error.args[0] if error.args and isinstance(error.args[0], str) else ""
    return f"{type(error).__name__}: {message.partition(' @ ')[0]}".rstrip(": ")


def decode_counted(num_classes: int, on_bad_sample: OnBadSample, planned: int, skipped: torch.Tensor,
                   samples: Keyed) -> Iterator[tuple[str, Image.Image, int]]:
    """Decoded (seed, image, label); bad ones skipped or raised. Once the stream ends, `skipped[0]`
    holds the planned samples that did not come out."""
    decoded = 0
    for seed, sample in samples:
        try:
            image, label = decode_sample(sample, num_classes)
        except BadSample as problem:
            bad_sample(problem, on_bad_sample)
            continue
        decoded += 1
        yield seed, image, label
    skipped[0] = planned - decoded


def bad_sample(problem: BadSample, on_bad_sample: OnBadSample) -> None:
    if on_bad_sample == "fail":
        raise problem
    logger.warning(f"skipped: {problem}")


def refill(planned: int, batch_size: int, rng: random.Random,
           samples: Iterator[tuple[str, Image.Image, int]]) -> Iterator[tuple[str, Image.Image, int]]:
    """`samples`, then as many repeats of recent ones (augmented with seeds of their own) as were skipped."""
    recent: deque[tuple[str, Image.Image, int]] = deque(maxlen=batch_size)
    count = 0
    for sample in samples:
        recent.append(sample)
        count += 1
        yield sample
    if count < planned and not recent:
        raise BadSample(f"none of the {planned} samples planned for this loader could be used")
    for repeat in range(planned - count):
        seed, image, label = rng.choice(recent)
        yield f"{seed}:repeat:{repeat}", image, label


def augment(transform: Transform,
            samples: Iterator[tuple[str, Image.Image, int]]) -> Iterator[tuple[torch.Tensor, int]]:
    """Each sample transformed with a generator seeded by its own seed."""
    for seed, image, label in samples:
        yield transform(image, random.Random(seed)), label


def epoch_batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`loader`'s batches in the epoch's order. After a resume (`start_batch`), each DataLoader worker
    has left out its share of the batches already trained on, and the DataLoader, which starts its
    round-robin at worker 0 again, hands the rest over in another order: they are put back in order
    here (holding at most one batch per worker)."""
    stream = loader.dataset
    if not stream.start_batch or loader.num_workers <= 1:
        yield from loader
        return
    order = batch_order(stream.slot_batches())
    done = [order[:stream.start_batch].count(slot) for slot in range(len(stream.slots))]
    arriving = iter(batch_order([count - skip for count, skip in zip(stream.slot_batches(), done)]))
    waiting: dict[int, deque] = {slot: deque() for slot in range(len(stream.slots))}
    batches = iter(loader)
    for slot in order[stream.start_batch:]:
        while not waiting[slot]:
            waiting[next(arriving)].append(next(batches))
        yield waiting[slot].popleft()


def skipped_samples(loader: DataLoader) -> int:
    """Samples of `loader`'s plan that were skipped as bad (complete once the loader is exhausted)."""
    return int(loader.dataset.skipped.sum())


def collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def train_loader(shards: SplitShards, layout: ReaderLayout, transform: Transform, batch_size: int,
                 shuffle_buffer: int, seed: int, epoch: int, on_bad_sample: OnBadSample = "skip",
                 plan: EpochPlan | None = None, start_batch: int = 0) -> DataLoader:
    """This rank's training batches of `epoch`: exactly as many full batches on every rank, as `plan`
    says (default: the whole epoch for `layout`); from batch `start_batch` of the plan on when the
    epoch resumes with it (read them with `epoch_batches`)."""
    order = EpochOrder.of(shards.samples, batch_size, shuffle_buffer, seed, epoch)
    plan = plan or EpochPlan.whole_epoch(order.blocks, layout.world_size, layout.loader_workers)
    stream = EpochStream(shards.urls, order, plan.slots()[layout.rank], transform, num_classes=shards.num_classes,
                         on_bad_sample=on_bad_sample, start_batch=start_batch)
    return _loader(stream, replace(layout, loader_workers=plan.loader_workers))


def eval_loader(shards: SplitShards, layout: ReaderLayout, transform: Transform, batch_size: int,
                on_bad_sample: OnBadSample = "skip") -> DataLoader:
    """This rank's part of the split, in order: every usable sample exactly once across ranks."""
    plan = eval_plan(shards.samples, layout.world_size, layout.loader_workers)
    stream = EvalStream(shards.urls, plan[layout.rank], transform, batch_size, num_classes=shards.num_classes,
                        on_bad_sample=on_bad_sample)
    return _loader(stream, layout)


def _loader(stream: EpochStream | EvalStream, layout: ReaderLayout) -> DataLoader:
    # its own generator: starting the workers takes no number from torch's, which drop-path draws from
    return DataLoader(stream, batch_size=None, num_workers=layout.loader_workers, pin_memory=layout.pin_memory,
                      generator=torch.Generator())
