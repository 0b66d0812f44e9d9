"""`vitae prep`: one source -> shards staged locally (converted in this process or, with `--ray`, by
Ray tasks) -> published with a manifest, idempotently (an interrupted run leaves no manifest;
re-running completes it). See docs/design/dataset-format.md.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from infra.errors import UserError
from data_prep.conversion import Converted, convert_in_process
from data_prep.manifest import (
    DATASET_NAME, MANIFEST_NAME, REJECTS_NAME, SPLITS, DatasetInfo, manifest_to_parquet,
)
from infra.object_store import is_s3_url
from data_prep.sources import MAX_DIGITS_SIZE, Source, SourceImage, SourceOptions, open_source
from data_prep.splitting import check_fractions, shuffled, stratified_splits
from data_prep.locations import StagedFile, Storage, open_storage

MAX_WORKERS = 64  # decoding threads: each holds a decoded image and 8 results in flight


@dataclass(frozen=True)
class PrepOptions:
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    max_side: int | None = None
    shard_max_samples: int = 10_000
    shard_max_bytes: int = 256 * 2**20
    source: SourceOptions = field(default_factory=SourceOptions)
    workers: int = min(8, 2 * (os.cpu_count() or 1))
    staging_dir: str | None = None  # default: inside a local destination, else the system temp dir
    ray: bool = False  # convert with Ray tasks on the cluster at RAY_ADDRESS, not in this process
    ray_tasks: int | None = None  # Ray tasks at a time (None: as many as the cluster has CPUs)

    def recorded(self) -> dict:
        """The options that determine the dataset's content (written to dataset.json)."""
        recorded = asdict(self)
        for machine_specific in ("workers", "staging_dir", "ray", "ray_tasks"):
            del recorded[machine_specific]
        return recorded


@dataclass
class PrepSummary:
    dest: str
    split_counts: dict[str, int]
    images: int
    shards: int
    bytes: int
    rejected: int
    uploaded: int
    already_present: int
    convert_s: float
    upload_s: float
    uploaded_bytes: int

    def lines(self) -> list[str]:
        splits = ", ".join(f"{split} {count}" for split, count in self.split_counts.items())
        megabytes = self.uploaded_bytes / 1e6
        return [
            f"dataset:   {self.dest}",
            f"images:    {self.images} ({splits})",
            f"shards:    {self.shards} ({self.bytes / 1e6:.1f} MB); uploaded {self.uploaded}, "
            f"already present {self.already_present}",
            f"convert:   {self.images / max(self.convert_s, 1e-9):.0f} images/s ({self.convert_s:.1f} s)",
            f"upload:    {megabytes / max(self.upload_s, 1e-9):.1f} MB/s "
            f"({megabytes:.1f} MB in {self.upload_s:.1f} s)",
            f"rejected:  {self.rejected}" + (f" (listed in {self.dest}/{REJECTS_NAME})" if self.rejected else ""),
        ]


def prepare(source_spec: str, dest: str, options: PrepOptions = PrepOptions(),
            progress: bool = True) -> PrepSummary:
    """Convert `source_spec` into a complete dataset at `dest` (a directory or s3:// URL)."""
    _check_options(options)
    _check_apart(source_spec, dest)
    with ExitStack() as stack:
        spill = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vitae-source-", dir=options.staging_dir)))
        source = open_source(source_spec, spill, options.source)
        storage = open_storage(dest)
        storage.check(create=True)  # before the long conversion: a bad bucket or credentials fail now
        by_split = _assign_splits(source, options)
        staging_base = options.staging_dir or storage.staging_root()
        staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".vitae-prep-", dir=staging_base)))
        started = time.perf_counter()
        converted = _convert(source, by_split, staging, options, progress)
        convert_s = time.perf_counter() - started
        info = _dataset_info(source_spec, source, converted, options)
        started = time.perf_counter()
        to_upload = _publish(storage, staging, converted, info, progress)
        upload_s = time.perf_counter() - started
    return PrepSummary(
        dest=dest,
        split_counts={split: counts["samples"] for split, counts in info.counts.items()},
        images=sum(r.samples for r in converted.records),
        shards=len(converted.records),
        bytes=sum(r.bytes for r in converted.records),
        rejected=len(converted.rejects),
        uploaded=len(to_upload),
        already_present=len(converted.records) - len(to_upload),
        convert_s=convert_s,
        upload_s=upload_s,
        uploaded_bytes=sum(f.size for f in to_upload),
    )


def _check_options(options: PrepOptions) -> None:
    check_fractions(options.val_fraction, options.test_fraction)
    positive = {"--max-side": options.max_side, "--shard-max-samples": options.shard_max_samples,
                "--shard-max-mb": options.shard_max_bytes, "--workers": options.workers,
                "--digits-size": options.source.digits_size, "--ray-tasks": options.ray_tasks}
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    for flag, value, limit in (("--workers", options.workers, MAX_WORKERS),
                               ("--digits-size", options.source.digits_size, MAX_DIGITS_SIZE)):
        if value > limit:
            raise UserError(f"{flag} must be at most {limit}, got {value}")


def _check_apart(source_spec: str, dest: str) -> None:
    """A local destination inside the source folder (or holding it) would be read as source by the next run."""
    if source_spec == "digits" or is_s3_url(dest):
        return
    source, target = Path(source_spec).expanduser().resolve(), Path(dest).expanduser().resolve()
    if target.is_relative_to(source):
        raise UserError(f"--out {dest} is inside the source {source_spec}: write the dataset elsewhere")
    if source.is_relative_to(target):
        raise UserError(f"the source {source_spec} is inside --out {dest}: write the dataset elsewhere")


def _assign_splits(source: Source, options: PrepOptions) -> dict[str, list[SourceImage]]:
    if source.has_splits:
        names = [image.split for image in source.images]
    else:
        labels = [image.label for image in source.images]
        names = stratified_splits(labels, options.val_fraction, options.test_fraction, options.seed)
    by_split: dict[str, list[SourceImage]] = {split: [] for split in SPLITS}
    for image, split in zip(source.images, names):
        by_split[split].append(image)
    return by_split


def _convert(source: Source, by_split: dict[str, list[SourceImage]], staging: Path, options: PrepOptions,
             progress: bool) -> Converted:
    planned = {split: shuffled(images, options.seed, split) for split, images in by_split.items()}
    shard_limits = (options.shard_max_samples, options.shard_max_bytes)
    if options.ray:
        # imports ray: only when asked to, so that importing prep (the quickstart, the benchmarks do it
        # before they start the stack) leaves Ray's settings to be read from the stack's environment
        from data_prep.ray_conversion import convert_on_ray

        converted = convert_on_ray(planned, staging, options.max_side, *shard_limits, options.ray_tasks, progress)
    else:
        with tqdm(total=len(source.images), unit="img", desc="convert", disable=not progress) as bar:
            converted = convert_in_process(planned, staging, options.max_side, *shard_limits, options.workers,
                                           bar.update)
    converted.rejects[:0] = source.rejects
    if not converted.records:
        first = converted.rejects[0]
        raise UserError(f"no usable images in {source.description}: all {len(converted.rejects)} rejected "
                        f"(first: {first.source_id}: {first.reason})")
    return converted


def _dataset_info(source_spec: str, source: Source, converted: Converted, options: PrepOptions) -> DatasetInfo:
    counts = {
        split: {"samples": sum(per_class.values()),
                "per_class": {name: per_class[index] for index, name in enumerate(source.class_names)}}
        for split, per_class in converted.class_counts.items()
    }
    recorded = options.recorded() | {"splits": "source" if source.has_splits else "stratified"}
    return DatasetInfo(
        class_names=source.class_names,
        counts=counts,
        source=source_spec if source_spec == "digits" else str(Path(source_spec).expanduser().absolute()),
        options=recorded,
        rejected=len(converted.rejects),
        shards=dict(Counter(record.split for record in converted.records)),
    )


def _publish(storage: Storage, staging: Path, converted: Converted, info: DatasetInfo,
             progress: bool) -> list[StagedFile]:
    """Store changed shards, then the rejects report and the manifest; returns what was uploaded."""
    storage.delete(DATASET_NAME)  # the dataset is incomplete from here until the manifest is back
    storage.delete(MANIFEST_NAME)
    to_upload = [StagedFile(staging / r.name, r.name, r.bytes, r.sha256) for r in converted.records
                 if storage.stored_sha256(r.name) != r.sha256]
    with tqdm(total=sum(f.size for f in to_upload), unit="B", unit_scale=True, desc="upload",
              disable=not progress) as bar:
        storage.publish(to_upload, bar.update)
    rejects = "".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in converted.rejects)
    storage.write_bytes(REJECTS_NAME, rejects.encode())
    storage.write_bytes(MANIFEST_NAME, manifest_to_parquet(converted.records))
    storage.write_bytes(DATASET_NAME, info.to_json())
    return to_upload
