"""Writing one split's samples into byte-reproducible WebDataset shards with webdataset's ShardWriter,
hashing each shard as it closes. See docs/design/dataset-format.md.
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
