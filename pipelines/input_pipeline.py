"""The input pipeline of one training worker: a prepared dataset's shards streamed with webdataset
(through data_prep's `s3://` opener), read as the `sharding` plan assigns them to this rank and its
DataLoader workers, decoded and transformed with PIL in those workers, shuffled in a buffer and
batched as uint8 tensors.

A new DataLoader is built per epoch (its workers receive that epoch's plan); each loader worker
seeds its shuffle and augmentation from (seed, epoch, rank, worker), so a run is reproducible.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.dataset import PreparedDataset, decode_sample
from pipelines.sharding import ShardRange, eval_plan, train_plan

Transform = Callable[[Image.Image, random.Random], torch.Tensor]
SHUFFLE_INITIAL = 100  # samples buffered before the first is yielded


@dataclass(frozen=True)
class SplitShards:
    """One split of a prepared dataset, as read by webdataset: shard URLs and their sample counts."""

    urls: list[str]
    samples: list[int]

    @classmethod
    def of(cls, dataset: PreparedDataset, split: str) -> SplitShards:
        return cls(dataset.shard_urls(split), dataset.shard_samples(split))

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
    """The batches of one rank: each DataLoader worker reads its slot of the plan."""

    def __init__(self, urls: list[str], slots: list[list[ShardRange]], transform: Transform, batch_size: int,
                 shuffle_buffer: int, seed: str, partial_batches: bool):
        super().__init__()
        self.urls, self.slots, self.transform = urls, slots, transform
        self.batch_size, self.shuffle_buffer, self.seed = batch_size, shuffle_buffer, seed
        self.partial_batches = partial_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = get_worker_info().id if get_worker_info() else 0
        rng = random.Random(f"{self.seed}:{worker}")
        stages = [
            partial(read_ranges, self.urls, self.slots[worker]),
            wds.shuffle(self.shuffle_buffer, initial=min(SHUFFLE_INITIAL, self.shuffle_buffer), rng=rng)
            if self.shuffle_buffer > 1 else None,
            wds.map(decode_sample),
            wds.map(lambda sample: (self.transform(sample[0], rng), sample[1])),
            wds.batched(self.batch_size, collation_fn=collate, partial=self.partial_batches),
        ]
        return iter(wds.DataPipeline(*stages))


def read_ranges(urls: list[str], ranges: list[ShardRange]) -> Iterator[dict]:
    """Raw webdataset samples of each range, in order (a shard is read from its start)."""
    for piece in ranges:
        samples = wds.tarfile_samples([{"url": urls[piece.shard]}])
        yield from itertools.islice(samples, piece.start, piece.stop)
        samples.close()


def collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def train_loader(shards: SplitShards, layout: ReaderLayout, transform: Transform, batch_size: int,
                 shuffle_buffer: int, seed: int, epoch: int) -> DataLoader:
    """This rank's training batches for `epoch`: exactly as many full batches on every rank."""
    plan = train_plan(shards.samples, layout.world_size, layout.loader_workers, batch_size, seed, epoch)
    stream = PlannedStream(shards.urls, plan[layout.rank], transform, batch_size, shuffle_buffer,
                           f"train:{seed}:{epoch}:{layout.rank}", partial_batches=False)
    return _loader(stream, layout)


def eval_loader(shards: SplitShards, layout: ReaderLayout, transform: Transform, batch_size: int) -> DataLoader:
    """This rank's part of the split, in order: every sample exactly once across ranks."""
    plan = eval_plan(shards.samples, layout.world_size, layout.loader_workers)
    stream = PlannedStream(shards.urls, plan[layout.rank], transform, batch_size, shuffle_buffer=1,
                           seed=f"eval:{layout.rank}", partial_batches=True)
    return _loader(stream, layout)


def _loader(stream: PlannedStream, layout: ReaderLayout) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=layout.loader_workers, pin_memory=layout.pin_memory)
