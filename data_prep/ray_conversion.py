"""`vitae prep --ray`: the conversion as Ray tasks on the cluster at RAY_ADDRESS. Encode tasks judge
consecutive chunks of each split's planned images; the driver places the shard boundaries from their
sizes (`ShardPlanner`, ShardWriter's rule) and write tasks each write whole shards to the staging
directory: the same shards and rejects as `convert_in_process`. Why and how fast: docs/datasets.md."""

from __future__ import annotations

import os
from collections import Counter, deque
from pathlib import Path

import ray
from tqdm import tqdm

from data_prep.conversion import Converted, encode_image
from data_prep.shards import EncodedSample, ShardPlanner, payload_bytes, write_shard
from data_prep.sources import Reject, SourceImage
from infra.errors import UserError

ENCODE_CHUNK = 128  # images per encode task
TASK_RETRIES = 3  # a task that fails (its worker died, an exception) runs again this often


@ray.remote(num_returns=2, max_retries=TASK_RETRIES, retry_exceptions=True)
def encode_chunk(images: list[SourceImage], max_side: int | None) -> tuple[list, list[EncodedSample]]:
    """(per image: its `Reject`, or its label and payload bytes; the accepted samples)."""
    results = [encode_image(image, max_side) for image in images]
    judged = [r if isinstance(r, Reject) else (r.label, payload_bytes(r)) for r in results]
    return judged, [r for r in results if not isinstance(r, Reject)]


@ray.remote(max_retries=TASK_RETRIES, retry_exceptions=True)
def write_shard_task(directory: Path, split: str, index: int, first_position: int,
                     slices: list[tuple[int, int]], *chunks: list[EncodedSample]):
    samples = [sample for (start, stop), chunk in zip(slices, chunks) for sample in chunk[start:stop]]
    return write_shard(directory, split, index, first_position, samples)


class _Tasks:
    """The tasks in flight, at most `limit`; counts finished write tasks on the progress bar."""

    def __init__(self, limit: int, bar: tqdm):
        self.limit, self.bar = limit, bar
        self.pending: list[ray.ObjectRef] = []
        self.writes: set[ray.ObjectRef] = set()

    def make_room(self) -> None:
        while len(self.pending) >= self.limit:
            done, self.pending = ray.wait(self.pending, num_returns=1)
            self.bar.update(sum(1 for ref in done if ref in self.writes))

    def add(self, ref: ray.ObjectRef, write: bool = False) -> None:
        self.pending.append(ref)
        if write:
            self.writes.add(ref)
            self.bar.total = len(self.writes)
            self.bar.refresh()

    def finish(self, refs: list[ray.ObjectRef]) -> list:
        """The tasks' results, in order; `UserError` naming the cause if one failed every attempt."""
        results = []
        for ref in refs:
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayError as error:
                cause = getattr(error, "cause", None) or error  # a task's own exception, else Ray's
                lines = str(cause).strip().splitlines()
                what = f"{type(cause).__name__}: {lines[-1]}" if lines else type(cause).__name__
                raise UserError(f"a conversion task failed, run {TASK_RETRIES + 1} times at most: {what}") from None
            if ref in self.pending:
                self.pending.remove(ref)
                self.bar.update(ref in self.writes)
        return results


class _SplitShards:
    """One split's shards as its encode results come in, in order: boundaries, then a write task per shard."""

    def __init__(self, split: str, staging: Path, planner: ShardPlanner, tasks: _Tasks, converted: Converted):
        self.split, self.staging, self.planner, self.tasks = split, staging, planner, tasks
        self.rejects, self.counts = converted.rejects, converted.class_counts.setdefault(split, Counter())
        self.writes: list[ray.ObjectRef] = []
        self.open: list[list] = []  # the open shard's samples: [chunk of samples, start, stop]
        self.position = self.first_position = 0

    def take(self, judged: list, chunk: ray.ObjectRef) -> None:
        index = 0  # among the chunk's accepted samples
        for result in judged:
            if isinstance(result, Reject):
                self.rejects.append(result)
                continue
            label, payload = result
            self.counts[label] += 1
            if self.planner.add(payload):
                self.close()
            if self.open and self.open[-1][0] is chunk:
                self.open[-1][2] = index + 1
            else:
                self.open.append([chunk, index, index + 1])
            index += 1
            self.position += 1

    def close(self) -> None:
        """Submit the open shard's write task, if it holds samples; the next shard starts here."""
        if self.open:
            self.tasks.make_room()
            ref = write_shard_task.remote(self.staging, self.split, len(self.writes), self.first_position,
                                          [(start, stop) for _, start, stop in self.open],
                                          *(chunk for chunk, _, _ in self.open))
            self.tasks.add(ref, write=True)
            self.writes.append(ref)
        self.open, self.first_position = [], self.position


def convert_on_ray(planned: dict[str, list[SourceImage]], staging: Path, max_side: int | None,
                   shard_max_samples: int, shard_max_bytes: int, tasks: int | None, progress: bool) -> Converted:
    """`convert_in_process`'s result, computed by at most `tasks` Ray tasks at a time (default: as many as
    the cluster has CPUs)."""
    connect()
    tasks = tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
    converted = Converted()
    writes: list[ray.ObjectRef] = []
    with tqdm(total=0, unit="shard", desc="convert (ray)", disable=not progress) as bar:
        flight = _Tasks(tasks, bar)
        for split, images in planned.items():
            shards = _SplitShards(split, staging, ShardPlanner(shard_max_samples, shard_max_bytes), flight, converted)
            encodes: deque = deque()
            for start in range(0, len(images), ENCODE_CHUNK):
                flight.make_room()
                judged, samples = encode_chunk.remote(images[start:start + ENCODE_CHUNK], max_side)
                flight.add(judged)
                encodes.append((judged, samples))
                while encodes and ray.wait([encodes[0][0]], timeout=0)[0]:
                    _take_next(encodes, shards, flight)
            while encodes:
                _take_next(encodes, shards, flight)
            shards.close()
            writes += shards.writes
        converted.records = flight.finish(writes)
    return converted


def _take_next(encodes: deque, shards: _SplitShards, flight: _Tasks) -> None:
    judged, samples = encodes.popleft()
    shards.take(flight.finish([judged])[0], samples)


def connect() -> None:
    """`ray.init()` (RAY_ADDRESS names the cluster) unless connected; `UserError` if nobody answers."""
    if ray.is_initialized():
        return
    try:
        ray.init()
    except ConnectionError as error:
        raise UserError(f"no Ray cluster answered at {os.environ.get('RAY_ADDRESS')} (RAY_ADDRESS): {error}") from None
