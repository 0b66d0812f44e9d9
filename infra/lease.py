"""A lease on an object-storage key: mutual exclusion between processes on any machine, renewed
while held, broken when its holder is gone (how and why: docs/design/s3.md, "The lease")."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import psutil

from infra.errors import UserError
from infra.object_store import ObjectStore, StoredObject

REPORT_EVERY_S = 60.0


def _process_started(pid: int) -> str:
    """The start time of process `pid` (tells it from a later process given the same id), or ""."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return ""


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Lease:
    store: ObjectStore
    key: str
    ttl_s: float = 60.0
    timeout_s: float = 300.0
    poll_s: float = 0.5
    etag: str | None = None
    report: Callable[[str], None] = _to_stderr  # where the waiting messages go
    lost: str | None = field(default=None, init=False)  # why the lease stopped being ours, while held
    token: str = field(default_factory=lambda: uuid.uuid4().hex, init=False)  # this holding, in the metadata
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _renewer: threading.Thread | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"s3://{self.store.bucket}/{self.key}"

    def _metadata(self) -> dict[str, str]:
        pid = os.getpid()
        return {"holder": f"{socket.gethostname()}:{pid}", "host": socket.gethostname(), "pid": str(pid),
                "pid-started": _process_started(pid), "expires-at": f"{time.time() + self.ttl_s:.3f}",
                "token": self.token}

    def acquire(self) -> Lease:
        deadline = time.monotonic() + self.timeout_s
        next_report = time.monotonic()
        self.token = uuid.uuid4().hex
        while True:
            # a unique body gives each holder its own ETag, which renewal and release check against
            self.etag = self.store.put_if_absent(self.key, uuid.uuid4().bytes, self._metadata())
            current = None if self.etag else self.store.head(self.key)
            if self.etag or self._ours(current):
                self.etag = self.etag or current.etag
                self.lost = None
                return self
            if current and self._breakable(current):
                self.store.delete_if_match(self.key, current.etag)
                continue
            holder = describe_holder(current)
            if self.timeout_s <= 0:
                raise UserError(f"{self.url} is held by {holder}")
            if time.monotonic() > deadline:
                raise UserError(f"{self.url} is still held by {holder} after {self.timeout_s:.0f}s; if that "
                                "process is gone, delete the object")
            if time.monotonic() >= next_report:
                self.report(f"waiting for {self.url}: held by {holder}")
                next_report = time.monotonic() + REPORT_EVERY_S
            time.sleep(self.poll_s)

    def _ours(self, current: StoredObject | None) -> bool:
        """This holding wrote `current`: a retried request whose first attempt had succeeded."""
        return current is not None and current.metadata.get("token") == self.token

    def _breakable(self, current: StoredObject) -> bool:
        """The holder is gone: its lease expired, or it was a process of this host that has ended."""
        metadata = current.metadata
        if float(metadata.get("expires-at", 0)) < time.time():
            return True
        if metadata.get("host") != socket.gethostname() or not metadata.get("pid", "").isdigit():
            return False
        return _process_started(int(metadata["pid"])) != metadata.get("pid-started")

    def renew(self) -> bool:
        """Extend the lease by its TTL if it is still ours; False (and `lost` says why) if not."""
        etag = self.store.put_if_match(self.key, uuid.uuid4().bytes, self.etag, self._metadata())
        if etag is None:
            current = self.store.head(self.key)
            etag = current.etag if self._ours(current) else None
        if etag is None:
            self.lost = f"{self.url} was taken over or deleted while held by this process"
            return False
        self.etag = etag
        return True

    def check(self) -> None:
        """`UserError` if the lease was lost while held."""
        if self.lost:
            raise UserError(self.lost)

    def _keep_renewed(self) -> None:
        expires = time.monotonic() + self.ttl_s
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    return
                expires = time.monotonic() + self.ttl_s
            except UserError as error:  # the store did not answer: try again until the lease expires
                if time.monotonic() > expires:
                    self.lost = f"{self.url} expired: it could not be renewed ({error})"
                    return

    def release(self) -> None:
        self._stop.set()
        if self._renewer:
            self._renewer.join()
            self._renewer = None
        if self.etag:
            self.store.delete_if_match(self.key, self.etag)
            self.etag = None

    def __enter__(self) -> Lease:
        self.acquire()
        self._stop.clear()
        self._renewer = threading.Thread(target=self._keep_renewed, name=f"lease {self.key}", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:  # the block's own error is the one to report; an unreleased lease expires
            with contextlib.suppress(UserError):
                self.release()
            return
        self.release()
        self.check()


def describe_holder(current: StoredObject | None) -> str:
    """Who holds a lease, and until when, from its metadata."""
    if current is None:
        return "? (released meanwhile)"
    expires = float(current.metadata.get("expires-at", 0))
    until = time.strftime("%H:%M:%S", time.localtime(expires))
    return f"{current.metadata.get('holder', '?')} (until {until} unless renewed)"
