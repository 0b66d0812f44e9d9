"""Reading a prepared dataset, the only way training code sees the shard format: `PreparedDataset`
(shard URLs and counts of a complete dataset), `decode_sample` (the readers' judge of a sample,
raising `BadSample`), and webdataset's `s3://` opener, registered on import. See
docs/design/dataset-format.md.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from PIL import Image

from data_prep import images
from infra.errors import UserError
from data_prep.manifest import (
    DATASET_NAME, FORMAT_VERSION, IMAGE_EXTENSIONS, MANIFEST_NAME, DatasetInfo, ShardRecord,
    manifest_from_parquet,
)
from infra.object_store import parse_s3_url, shared_store
from data_prep.locations import Storage, open_storage


@dataclass
class PreparedDataset:
    url: str
    info: DatasetInfo
    shards: list[ShardRecord]
    storage: Storage

    @classmethod
    def open(cls, url: str) -> PreparedDataset:
        """Read the manifest at `url`; `UserError` if it is missing (dataset incomplete)."""
        storage = open_storage(url)
        storage.check(create=False)
        info_bytes, manifest_bytes = storage.read_bytes(DATASET_NAME), storage.read_bytes(MANIFEST_NAME)
        if info_bytes is None or manifest_bytes is None:
            raise UserError(f"no complete dataset at {url}: {DATASET_NAME} or {MANIFEST_NAME} is missing "
                            "(run `vitae prep` to completion)")
        info = DatasetInfo.from_json(info_bytes)
        if info.format_version != FORMAT_VERSION:
            raise UserError(f"{url}: dataset format {info.format_version}, this reader supports {FORMAT_VERSION}")
        return cls(url, info, manifest_from_parquet(manifest_bytes), storage)

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @property
    def splits(self) -> list[str]:
        return sorted({shard.split for shard in self.shards})

    def split_shards(self, split: str) -> list[ShardRecord]:
        return [shard for shard in self.shards if shard.split == split]

    def shard_urls(self, split: str) -> list[str]:
        return [self.storage.shard_url(shard.name) for shard in self.split_shards(split)]

    def shard_samples(self, split: str) -> list[int]:
        """Samples per shard, in `shard_urls` order."""
        return [shard.samples for shard in self.split_shards(split)]

    def num_samples(self, split: str) -> int:
        return sum(self.shard_samples(split))

    def manifest_sha256(self) -> str:
        """The SHA-256 of the manifest's bytes: names this exact version of the dataset."""
        manifest = self.storage.read_bytes(MANIFEST_NAME)
        if manifest is None:
            raise UserError(f"{self.url}: {MANIFEST_NAME} has disappeared")
        return hashlib.sha256(manifest).hexdigest()


class BadSample(UserError):
    """A sample that cannot be used, or the unreadable rest of a shard; the message names the shard."""


OnBadSample = Literal["skip", "fail"]  # what a reader does with a `BadSample`


UNSAFE_NAME = re.compile(r"^[/\\]|(^|[/\\])\.\.([/\\]|$)")  # absolute, or a `..` component


def shard_name_of(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def decode_sample(sample: dict, num_classes: int | None = None) -> tuple[Image.Image, int]:
    """A raw webdataset sample (bytes per extension) -> (RGB PIL image, class index in
    [0, num_classes) when `num_classes` is given); `BadSample` if it is unusable."""
    key = sample.get("__key__", "")
    where = f"{shard_name_of(sample.get('__url__', '?'))}: sample {key!r}"
    if UNSAFE_NAME.search(key):
        raise BadSample(f"{where}: unsafe member name (absolute or with '..')")
    extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if extension is None:
        raise BadSample(f"{where}: no image ({', '.join(IMAGE_EXTENSIONS)})")
    try:
        label = int(sample["cls"])
    except (KeyError, ValueError):
        raise BadSample(f"{where}: no integer label (.cls)") from None
    if num_classes is not None and not 0 <= label < num_classes:
        raise BadSample(f"{where}: label {label} not in [0, {num_classes})")
    try:
        image = images.to_rgb(images.decode(sample[extension]))
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadSample(f"{where}: undecodable image ({type(error).__name__}: {error})") from None
    return image, label


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset opener for `s3://bucket/key`: a streaming GetObject body."""
    if mode != "rb":
        raise ValueError(f"{url}: the s3 opener only reads (mode 'rb'), got {mode!r}")
    location = parse_s3_url(url)
    return shared_store(location.bucket).open(location.key)


def register_s3_opener() -> None:
    from webdataset.gopen import gopen_schemes  # the dispatch table webdataset's gopen() consults

    gopen_schemes["s3"] = gopen_s3


register_s3_opener()
