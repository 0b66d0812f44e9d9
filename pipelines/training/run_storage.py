"""Where Ray Train keeps runs: `checkpoint.storage_path` as Ray's storage path and the filesystem
that reaches it (`s3://bucket/prefix` on `infra.s3`'s pyarrow filesystem), the earlier run of the
same name (which Ray Train resumes), and the lease that lets one driver at a time train a run name.
See docs/design/s3.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from infra.errors import UserError
from infra.lease import Lease
from infra.object_store import is_s3_url, parse_s3_url, shared_store
from infra.s3 import S3Config, s3_filesystem

LEASES = ".leases"
LEASE_TTL_S = 60.0  # renewed every third of it while held


@dataclass(frozen=True)
class RunStorage:
    url: str
    path: str  # RunConfig.storage_path
    filesystem: object | None  # RunConfig.storage_filesystem (pyarrow.fs.FileSystem); None: local

    @classmethod
    def open(cls, url: str) -> RunStorage:
        """Check that the location is usable (the bucket exists, the directory can be made)."""
        if is_s3_url(url):
            location = parse_s3_url(url)
            shared_store(location.bucket).check_bucket()
            return cls(url, f"{location.bucket}/{location.key}".rstrip("/"), s3_filesystem(S3Config.from_env()))
        directory = Path(url).expanduser().absolute()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"cannot use checkpoint directory {directory}: {error.strerror}") from None
        return cls(url, str(directory), None)

    def run_url(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"

    @contextlib.contextmanager
    def hold(self, name: str) -> Iterator[None]:
        """Run `name` is this process's while the block runs; a `UserError` naming the holder if it
        is another driver's."""
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self._lease(name))
            except UserError as refusal:
                raise UserError(f"run {name} is being trained by another driver: {refusal}") from None
            yield

    def _lease(self, name: str) -> contextlib.AbstractContextManager:
        if self.filesystem is None:
            return file_lease(Path(self.path) / LEASES / f"{name}.lock")
        location = parse_s3_url(self.url)
        key = "/".join(part for part in (location.key.strip("/"), LEASES, name) if part)
        return Lease(shared_store(location.bucket), key, ttl_s=LEASE_TTL_S, timeout_s=0)

    def previous_result(self, name: str):
        """The `ray.train.Result` of an earlier run `name` here, or None if there is none."""
        from ray.train import Result

        train_logger = logging.getLogger("ray.train")
        level = train_logger.level
        train_logger.setLevel(logging.WARNING)  # not "A run snapshot was found...": this only looks
        try:
            return Result.from_path(f"{self.path}/{name}", storage_filesystem=self.filesystem)
        except RuntimeError:  # no run folder, or no checkpoint snapshot in it
            return None
        finally:
            train_logger.setLevel(level)


@contextlib.contextmanager
def file_lease(path: Path) -> Iterator[None]:
    """An exclusive lock on file `path` while the block runs, its holder written in the file; a
    `UserError` naming the holder at once if another process holds it."""
    import filelock

    path.parent.mkdir(mode=0o700, exist_ok=True)
    lock = filelock.FileLock(str(path), timeout=0, mode=0o600, on_acquired=_write_holder)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise UserError(f"{path} is held by {_read_holder(path)}") from None
    try:
        yield
    finally:
        lock.release()


def _write_holder(descriptor: int) -> None:
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{socket.gethostname()}:{os.getpid()}".encode(), 0)


def _read_holder(path: Path) -> str:
    try:
        return path.read_text() or "?"
    except OSError:
        return "?"
