"""The input pipeline of one training worker: a prepared dataset's shards streamed with webdataset,
read as the `sharding` plan assigns them to this rank and its DataLoader workers, decoded and
transformed with PIL, shuffled and batched as uint8 tensors; bad samples skipped (and counted) or
fatal, as configured; an epoch resumed at any batch exactly as it would have gone on
(docs/design/training.md).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.dataset import BadSample, OnBadSample, PreparedDataset, decode_sample, shard_name_of
from infra.errors import UserError
from pipelines.training.sharding import ShardRange, eval_plan, train_plan

logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image, random.Random], torch.Tensor]
SHUFFLE_INITIAL = 100  # samples buffered before the first is yielded
DESCRIBED_RANGES = 12  # shard ranges that `PlannedStream.describe_ranges` lists by name


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


class PlannedStream(IterableDataset):
    """The batches of one rank: each DataLoader worker reads its slot of the plan. With full
    batches only (training), skipped samples are replaced by repeats; `skipped` holds each slot's
    count, in shared memory so that the DataLoader's worker processes can write it."""

    def __init__(self, urls: list[str], slots: list[list[ShardRange]], transform: Transform, batch_size: int,
                 shuffle_buffer: int, seed: str, partial_batches: bool, *, num_classes: int,
                 on_bad_sample: OnBadSample, start_batch: int = 0):
        super().__init__()
        self.urls, self.slots, self.transform = urls, slots, transform
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.partial_batches = partial_batches
        self.num_classes, self.on_bad_sample = num_classes, on_bad_sample
        self.skipped = torch.zeros(len(slots), dtype=torch.int64).share_memory_()
        self.start_batch = start_batch  # batches of the epoch already trained on (a resumed epoch)

    def slot_batches(self) -> list[int]:
        """The full batches each slot yields (training plans hold whole batches only)."""
        return [sum(piece.samples for piece in slot) // self.batch_size for slot in self.slots]

    def describe_ranges(self) -> str:
        """What this rank reads, e.g. `704 samples from 5 shards: train-000003.tar[96:170] ...`."""
        ranges = [piece for slot in self.slots for piece in slot]
        names = [f"{shard_name_of(self.urls[piece.shard])}[{piece.start}:{piece.stop}]"
                 for piece in ranges[:DESCRIBED_RANGES]]
        more = f" and {len(ranges) - DESCRIBED_RANGES} more ranges" if len(ranges) > DESCRIBED_RANGES else ""
        return (f"{sum(piece.samples for piece in ranges)} samples from "
                f"{len({piece.shard for piece in ranges})} shards: {' '.join(names)}{more}")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info().id if get_worker_info() else 0
        rng = random.Random(f"{self.seed}:{worker}")
        planned = sum(piece.samples for piece in self.slots[worker])
        done = batch_order(self.slot_batches())[:self.start_batch].count(worker) if self.start_batch else 0
        stages = [
            partial(read_ranges, self.urls, self.slots[worker], self.on_bad_sample),
            wds.shuffle(self.shuffle_buffer, initial=min(SHUFFLE_INITIAL, self.shuffle_buffer), rng=rng)
            if self.shuffle_buffer > 1 else None,
            partial(decode_counted, self.num_classes, self.on_bad_sample, planned, self.skipped[worker:worker + 1]),
            None if self.partial_batches else partial(refill, planned, self.batch_size, rng),
            partial(augment, self.transform, rng, done * self.batch_size),
            wds.batched(self.batch_size, collation_fn=collate, partial=self.partial_batches),
        ]
        return iter(wds.DataPipeline(*stages))


def read_ranges(urls: list[str], ranges: list[ShardRange], on_bad_sample: OnBadSample) -> Iterator[dict]:
    """Raw webdataset samples of each range, in order (a shard is read from its start). A shard that
    breaks off (truncated, corrupt tar) is a bad sample for the rest of the range."""
    for piece in ranges:
        failures: list[Exception] = []  # webdataset's handler: record the error, stop this shard
        samples = wds.tarfile_samples([{"url": urls[piece.shard]}], handler=failures.append)
        read = 0
        for sample in itertools.islice(samples, piece.start, piece.stop):
            read += 1
            yield sample
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
                   samples: Iterator[dict]) -> Iterator[tuple[Image.Image, int]]:
    """Decoded (image, label) pairs; bad ones skipped or raised. Once the stream ends, `skipped[0]`
    holds the planned samples that did not come out."""
    decoded = 0
    for sample in samples:
        try:
            pair = decode_sample(sample, num_classes)
        except BadSample as problem:
            bad_sample(problem, on_bad_sample)
            continue
        decoded += 1
        yield pair
    skipped[0] = planned - decoded


def bad_sample(problem: BadSample, on_bad_sample: OnBadSample) -> None:
    if on_bad_sample == "fail":
        raise problem
    logger.warning(f"skipped: {problem}")


def refill(planned: int, batch_size: int, rng: random.Random,
           samples: Iterator[tuple[Image.Image, int]]) -> Iterator[tuple[Image.Image, int]]:
    """`samples`, then as many repeats of recent ones (re-augmented downstream) as were skipped."""
    recent: deque[tuple[Image.Image, int]] = deque(maxlen=batch_size)
    count = 0
    for pair in samples:
        recent.append(pair)
        count += 1
        yield pair
    if count < planned and not recent:
        raise BadSample(f"none of the {planned} samples planned for this loader could be used")
    for _ in range(planned - count):
        yield rng.choice(recent)


def augment(transform: Transform, rng: random.Random, skip: int,
            samples: Iterator[tuple[Image.Image, int]]) -> Iterator[tuple[torch.Tensor, int]]:
    """Each sample transformed with a generator of its own (one draw of `rng`); the first `skip` are
    left out untransformed, their draws made, so that the rest come out as in an uninterrupted epoch."""
    for index, (image, label) in enumerate(samples):
        sample_rng = random.Random(rng.getrandbits(64))
        if index >= skip:
            yield transform(image, sample_rng), label


def batch_order(slot_batches: Sequence[int]) -> list[int]:
    """The slot (DataLoader worker) of each batch of an epoch, in the order a DataLoader delivers
    them: round-robin from worker 0, workers that have finished left out."""
    order, left = [], list(slot_batches)
    while any(left):
        for slot, count in enumerate(left):
            if count:
                order.append(slot)
                left[slot] -= 1
    return order


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
                 start_batch: int = 0) -> DataLoader:
    """This rank's training batches for `epoch`: exactly as many full batches on every rank; from
    batch `start_batch` on when the epoch resumes (read them with `epoch_batches`)."""
    plan = train_plan(shards.samples, layout.world_size, layout.loader_workers, batch_size, seed, epoch)
    stream = PlannedStream(shards.urls, plan[layout.rank], transform, batch_size, shuffle_buffer,
                           f"train:{seed}:{epoch}:{layout.rank}", partial_batches=False,
                           num_classes=shards.num_classes, on_bad_sample=on_bad_sample, start_batch=start_batch)
    return _loader(stream, layout)


def eval_loader(shards: SplitShards, layout: ReaderLayout, transform: Transform, batch_size: int,
                on_bad_sample: OnBadSample = "skip") -> DataLoader:
    """This rank's part of the split, in order: every usable sample exactly once across ranks."""
    plan = eval_plan(shards.samples, layout.world_size, layout.loader_workers)
    stream = PlannedStream(shards.urls, plan[layout.rank], transform, batch_size, shuffle_buffer=1,
                           seed=f"eval:{layout.rank}", partial_batches=True, num_classes=shards.num_classes,
                           on_bad_sample=on_bad_sample)
    return _loader(stream, layout)


def _loader(stream: PlannedStream, layout: ReaderLayout) -> DataLoader:
    # its own generator: starting the workers takes no number from torch's, which drop-path draws from
    return DataLoader(stream, batch_size=None, num_workers=layout.loader_workers, pin_memory=layout.pin_memory,
                      generator=torch.Generator())
