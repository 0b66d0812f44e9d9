"""The dataset format: shard and sample naming, and the manifest (`manifest.parquet`, `dataset.json`)
that makes a dataset complete. See docs/design/dataset-format.md.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = ("jpg", "png", "webp", "bmp")
MANIFEST_NAME = "manifest.parquet"
DATASET_NAME = "dataset.json"
REJECTS_NAME = "rejects.jsonl"
SHARD_PATTERN = "{split}-%06d.tar"  # filled by webdataset's ShardWriter with the shard index


def sample_key(split: str, position: int) -> str:
    """Our own keys: no dots or slashes, so webdataset groups files into samples correctly."""
    return f"{split}_{position:09d}"


@dataclass(frozen=True)
class ShardRecord:
    split: str
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class DatasetInfo:
    class_names: list[str]
    counts: dict[str, dict[str, Any]]  # split -> {"samples": n, "per_class": {class name: n}}
    source: str
    options: dict[str, Any]
    rejected: int
    format_version: int = FORMAT_VERSION
    shards: dict[str, int] = field(default_factory=dict)  # split -> number of shards

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> DatasetInfo:
        return cls(**json.loads(data))


def manifest_to_parquet(records: list[ShardRecord]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([asdict(r) for r in records], schema=_manifest_schema())
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def manifest_from_parquet(data: bytes) -> list[ShardRecord]:
    import pyarrow.parquet as pq

    return [ShardRecord(**row) for row in pq.read_table(io.BytesIO(data)).to_pylist()]


def _manifest_schema():
    import pyarrow as pa

    return pa.schema(
        [("split", pa.string()), ("name", pa.string()), ("samples", pa.int64()),
         ("bytes", pa.int64()), ("sha256", pa.string())]
    )
