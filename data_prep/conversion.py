"""Converting the planned images (each split's images in their shuffled order) into staged shards in
this process: `encode_image` judges one image, `convert_in_process` runs it on a thread pool and
writes each split with `write_split`; `Converted` is what any conversion returns (`ray_conversion`
gives the same)."""

from __future__ import annotations

from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

from data_prep.images import RejectedImage, prepare_image
from data_prep.manifest import ShardRecord
from data_prep.shards import EncodedSample, write_split
from data_prep.sources import Reject, SourceImage


@dataclass
class Converted:
    records: list[ShardRecord] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    class_counts: dict[str, Counter] = field(default_factory=dict)


def encode_image(image: SourceImage, max_side: int | None) -> EncodedSample | Reject:
    try:
        data = image.read()
    except OSError as error:
        return Reject(image.source_id, f"unreadable ({error.strerror or error})")
    try:
        encoded, extension = prepare_image(data, max_side)
    except RejectedImage as error:
        return Reject(image.source_id, str(error))
    return EncodedSample(encoded, extension, image.label, image.source_id)


def convert_in_process(planned: dict[str, list[SourceImage]], staging: Path, max_side: int | None,
                       shard_max_samples: int, shard_max_bytes: int, workers: int,
                       advance: Callable[[int], object]) -> Converted:
    """Encode on `workers` threads, in order, and write each split's shards to `staging`; `advance(n)`
    counts images done."""
    converted = Converted()
    with ThreadPoolExecutor(workers) as pool:
        for split, images in planned.items():
            counts = converted.class_counts[split] = Counter()
            results = _ordered_map(pool, partial(encode_image, max_side=max_side), images, window=workers * 8)
            samples = _accepted(results, converted.rejects, counts, lambda: advance(1))
            converted.records += write_split(split, samples, staging, shard_max_samples, shard_max_bytes)
    return converted


def _ordered_map(pool: ThreadPoolExecutor, function: Callable, items: Iterable, window: int) -> Iterator:
    """`function` over `items` on `pool`, results in input order, at most `window` in flight."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _accepted(results: Iterable[EncodedSample | Reject], rejects: list[Reject], counts: Counter,
              advance: Callable[[], object]) -> Iterator[EncodedSample]:
    for result in results:
        advance()
        if isinstance(result, Reject):
            rejects.append(result)
        else:
            counts[result.label] += 1
            yield result
