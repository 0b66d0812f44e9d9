"""Where a dataset lives: `open_storage(url)` gives a `LocalDir` or an `S3Prefix`, the one interface
through which data_prep writes, reads and verifies datasets (flat object names, sha256 per shard).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Protocol

from infra.errors import UserError
from infra.object_store import ObjectStore, Upload, is_s3_url, parse_s3_url, shared_store

SHA256_METADATA = "sha256"


def sha256_stream(stream: BinaryIO, chunk_size: int = 2**20) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(chunk_size):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as stream:
        return sha256_stream(stream)


@dataclass(frozen=True)
class StagedFile:
    """A finished local file to publish under `name`."""

    path: Path
    name: str
    size: int
    sha256: str


class Storage(Protocol):
    """A dataset location. Missing objects read as None; user-caused failures raise `UserError`."""

    url: str

    def check(self, create: bool) -> None:
        """Fail unless usable: the directory exists (or is created) / the bucket is reachable."""

    def shard_url(self, name: str) -> str:
        """What webdataset opens: a local path or an s3:// URL."""

    def size(self, name: str) -> int | None: ...
    def stored_sha256(self, name: str) -> str | None: ...
    def read_bytes(self, name: str) -> bytes | None: ...
    def open(self, name: str) -> BinaryIO: ...
    def write_bytes(self, name: str, data: bytes) -> None: ...
    def delete(self, name: str) -> None: ...

    def publish(self, files: list[StagedFile], on_bytes: Callable[[int], None]) -> None:
        """Store staged files under their names, reporting bytes done to `on_bytes`."""

    def staging_root(self) -> Path | None:
        """Where to stage shards before `publish` (None: the system's temporary directory)."""


def open_storage(url: str) -> Storage:
    return S3Prefix(url) if is_s3_url(url) else LocalDir(url)


class LocalDir:
    def __init__(self, url: str):
        self.url = url
        self.root = Path(url).expanduser().absolute()

    def check(self, create: bool) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"destination is not a directory: {self.root}")
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise UserError(f"cannot create destination {self.root}: {error.strerror}") from None
        elif not self.root.is_dir():
            raise UserError(f"dataset directory not found: {self.root}")

    def shard_url(self, name: str) -> str:
        return str(self.root / name)

    def size(self, name: str) -> int | None:
        path = self.root / name
        return path.stat().st_size if path.is_file() else None

    def stored_sha256(self, name: str) -> str | None:
        path = self.root / name
        return sha256_file(path) if path.is_file() else None

    def read_bytes(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.is_file() else None

    def open(self, name: str) -> BinaryIO:
        return open(self.root / name, "rb")

    def write_bytes(self, name: str, data: bytes) -> None:
        partial = self.root / f".{name}.partial"
        partial.write_bytes(data)
        os.replace(partial, self.root / name)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def publish(self, files: list[StagedFile], on_bytes: Callable[[int], None]) -> None:
        """Move staged files into place (atomic rename when staged on the same filesystem)."""
        for staged in files:
            shutil.move(staged.path, self.root / staged.name)
            on_bytes(staged.size)

    def staging_root(self) -> Path | None:
        """Stage inside the dataset directory so that publishing is a rename."""
        return self.root


class S3Prefix:
    def __init__(self, url: str):
        self.url = url
        self.location = parse_s3_url(url)
        self._store: ObjectStore | None = None

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = shared_store(self.location.bucket)
        return self._store

    def key(self, name: str) -> str:
        return self.location.join(name).key

    def check(self, create: bool) -> None:
        self.store.check_bucket()

    def shard_url(self, name: str) -> str:
        return str(self.location.join(name))

    def size(self, name: str) -> int | None:
        stored = self.store.head(self.key(name))
        return stored.size if stored else None

    def stored_sha256(self, name: str) -> str | None:
        """The sha256 recorded when we uploaded it (None if absent or not ours)."""
        stored = self.store.head(self.key(name))
        return stored.metadata.get(SHA256_METADATA) if stored else None

    def read_bytes(self, name: str) -> bytes | None:
        if self.store.head(self.key(name)) is None:
            return None
        return self.store.get_bytes(self.key(name))

    def open(self, name: str) -> BinaryIO:
        return self.store.open(self.key(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        self.store.put_bytes(self.key(name), data)

    def delete(self, name: str) -> None:
        self.store.delete(self.key(name))

    def publish(self, files: list[StagedFile], on_bytes: Callable[[int], None]) -> None:
        uploads = [Upload(str(f.path), self.key(f.name), {SHA256_METADATA: f.sha256}) for f in files]
        self.store.upload_files(uploads, on_bytes)

    def staging_root(self) -> Path | None:
        """None: stage in the system's temporary directory."""
        return None
