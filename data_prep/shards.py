"""Writing one split's samples into byte-reproducible WebDataset shards with webdataset's ShardWriter,
hashing each shard as it closes; and the same shards one at a time (`ShardPlanner` places the
boundaries by ShardWriter's rule, `write_shard` writes one), for writers working in parallel. See
docs/design/dataset-format.md.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from data_prep.manifest import SHARD_PATTERN, ShardRecord, sample_key
from data_prep.locations import sha256_file

TAR_OPTIONS = dict(encoder=False, mtime=0, user="vitae", group="vitae", mode=0o444, format="USTAR_FORMAT")


@dataclass(frozen=True)
class EncodedSample:
    image: bytes
    extension: str
    label: int
    source_id: str


class _ShardFiles:
    """ShardWriter's opener/post pair: opens each shard file; on close, hashes it into a record."""

    def __init__(self, directory: Path, split: str):
        self.directory = directory
        self.split = split
        self.file = None
        self.samples: Counter[str] = Counter()  # per shard name, counted by the writing loop
        self.records: list[ShardRecord] = []

    def open(self, name: str):
        self.file = open(self.directory / name, "wb")
        return self.file

    def close(self, name: str) -> None:
        self.file.close()
        path = self.directory / name
        self.records.append(
            ShardRecord(self.split, name, self.samples[name], path.stat().st_size, sha256_file(path)))


def write_split(
    split: str, samples: Iterable[EncodedSample], directory: Path, max_count: int, max_bytes: int
) -> list[ShardRecord]:
    """Write `samples` (in order) to `directory/{split}-NNNNNN.tar`; nothing if there are none."""
    from webdataset import ShardWriter

    samples = iter(samples)
    first = next(samples, None)
    if first is None:
        return []  # ShardWriter opens its first shard eagerly: only start it for a non-empty split
    files = _ShardFiles(directory, split)
    writer = ShardWriter(
        SHARD_PATTERN.format(split=split), maxcount=max_count, maxsize=max_bytes, verbose=0,
        opener=files.open, post=files.close, **TAR_OPTIONS,
    )
    with writer:
        for position, sample in enumerate(itertools.chain([first], samples)):
            writer.write(_tar_sample(split, position, sample))
            files.samples[writer.fname] += 1
    return files.records


def _tar_sample(split: str, position: int, sample: EncodedSample) -> dict[str, bytes | str]:
    return {
        "__key__": sample_key(split, position),
        sample.extension: sample.image,
        "cls": str(sample.label).encode(),
        "json": json.dumps({"source": sample.source_id}, sort_keys=True, ensure_ascii=False).encode(),
    }


def payload_bytes(sample: EncodedSample) -> int:
    """What ShardWriter counts of a sample against its maxsize: the bytes of its members (TarWriter.write's
    return), which do not depend on the sample's position (keys have a fixed width)."""
    return sum(len(value) for name, value in _tar_sample("", 0, sample).items() if name != "__key__")


class ShardPlanner:
    """ShardWriter's boundaries ahead of writing: a sample starts a new shard when none is open or the
    open one holds `max_count` samples or `max_bytes` of payload."""

    def __init__(self, max_count: int, max_bytes: int):
        self.max_count, self.max_bytes = max_count, max_bytes
        self.count = self.size = 0
        self.started = False

    def add(self, payload: int) -> bool:
        """Count one sample of `payload` bytes; True if it opens a new shard."""
        opens = not self.started or self.count >= self.max_count or self.size >= self.max_bytes
        if opens:
            self.count = self.size = 0
            self.started = True
        self.count += 1
        self.size += payload
        return opens


def write_shard(directory: Path, split: str, index: int, first_position: int,
                samples: list[EncodedSample]) -> ShardRecord:
    """Shard `index` of `split` holding `samples` from split position `first_position`: the bytes
    `write_split` writes for it."""
    from webdataset import TarWriter

    name = SHARD_PATTERN.format(split=split) % index
    path = directory / name
    with open(path, "wb") as file:
        writer = TarWriter(file, **TAR_OPTIONS)
        for position, sample in enumerate(samples, start=first_position):
            writer.write(_tar_sample(split, position, sample))
        writer.close()
    return ShardRecord(split, name, len(samples), path.stat().st_size, sha256_file(path))
