"""`vitae verify`: check every shard of a dataset against its manifest (size, sha256, sample grouping
and count, `decode_sample`) and the per-split totals against dataset.json, streaming each shard once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import BinaryIO

from data_prep.dataset import BadSample, PreparedDataset, decode_sample
from infra.errors import UserError
from data_prep.manifest import ShardRecord


@dataclass
class VerifyReport:
    url: str
    shards: int = 0
    samples: int = 0
    splits: dict[str, str] = field(default_factory=dict)  # split -> "N shards, M samples"
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self, max_problems: int = 20) -> list[str]:
        splits = [f"{split}: {description}" for split, description in self.splits.items()]
        shown = [f"  {problem}" for problem in self.problems[:max_problems]]
        if len(self.problems) > max_problems:
            shown.append(f"  ... and {len(self.problems) - max_problems} more")
        verdict = "OK" if self.ok else f"FAILED: {len(self.problems)} problem(s)"
        summary = f"{verdict}: {self.shards} shards, {self.samples} samples read from {self.url}"
        return [*splits, *shown, summary]


class _HashingReader:
    """Wraps a stream, hashing and counting everything read through it."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n) if n is not None and n >= 0 else self.stream.read()
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(2**20):
            pass


def verify_dataset(url: str, progress: bool = True) -> VerifyReport:
    from tqdm import tqdm

    dataset = PreparedDataset.open(url)
    report = VerifyReport(url)
    for shard in tqdm(dataset.shards, unit="shard", desc="verify", disable=not progress):
        problems, samples = _check_shard(dataset, shard)
        report.problems += problems
        report.shards += 1
        report.samples += samples
    for split in dataset.splits:
        report.splits[split] = f"{len(dataset.split_shards(split))} shards, {dataset.num_samples(split)} samples"
    for split, counts in dataset.info.counts.items():
        if counts["samples"] != dataset.num_samples(split):
            report.problems.append(f"{split}: dataset.json counts {counts['samples']} samples, "
                                   f"manifest {dataset.num_samples(split)}")
    return report


def _check_shard(dataset: PreparedDataset, shard: ShardRecord) -> tuple[list[str], int]:
    """Problems found in one shard, and how many samples were read from it."""
    size = dataset.storage.size(shard.name)
    if size is None:
        return [f"{shard.name}: missing"], 0
    if size != shard.bytes:
        return [f"{shard.name}: {size} bytes, manifest says {shard.bytes}"], 0
    reader = _HashingReader(dataset.storage.open(shard.name))
    try:
        problems, samples = _check_samples(shard.name, reader, len(dataset.class_names))
        reader.drain()
    except UserError:  # the endpoint, not the shard
        raise
    except Exception as error:  # a corrupt tar stream: report it, keep verifying other shards
        return [f"{shard.name}: unreadable tar ({type(error).__name__}: {error})"], 0
    finally:
        reader.stream.close()
    if reader.sha256.hexdigest() != shard.sha256:
        problems.insert(0, f"{shard.name}: sha256 differs from the manifest")
    if samples != shard.samples:
        problems.append(f"{shard.name}: {samples} samples, manifest says {shard.samples}")
    return problems, samples


def _check_samples(name: str, stream: BinaryIO, num_classes: int) -> tuple[list[str], int]:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    problems, samples = [], 0
    for sample in group_by_keys(tar_file_expander([{"url": name, "stream": stream}])):
        samples += 1
        try:
            decode_sample(sample, num_classes)
        except BadSample as problem:
            problems.append(str(problem))
    return problems, samples
