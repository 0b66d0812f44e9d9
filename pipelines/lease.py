"""A lease on an object-storage key: mutual exclusion between processes on any machine.

Acquiring creates the key with an S3 conditional write (`If-None-Match: *`), so exactly one
contender succeeds. The object's metadata names the holder and when the lease expires, so a lease
whose holder died is broken once expired. Releasing deletes the key only while it is still ours
(`If-Match` on our ETag). The registry uses it to serialise promotions of one model.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass

from data_prep.errors import UserError
from data_prep.object_store import ObjectStore


@dataclass
class Lease:
    store: ObjectStore
    key: str
    ttl_s: float = 600.0
    timeout_s: float = 300.0
    poll_s: float = 0.5
    etag: str | None = None

    @property
    def holder(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def acquire(self) -> Lease:
        deadline = time.monotonic() + self.timeout_s
        while True:
            metadata = {"holder": self.holder, "expires-at": f"{time.time() + self.ttl_s:.3f}"}
            # a unique body gives each holder its own ETag, which release checks against
            self.etag = self.store.put_if_absent(self.key, uuid.uuid4().bytes, metadata)
            if self.etag:
                return self
            current = self.store.head(self.key)
            if current and float(current.metadata.get("expires-at", 0)) < time.time():
                self.store.delete_if_match(self.key, current.etag)  # its holder died: break it
                continue
            if time.monotonic() > deadline:
                holder = current.metadata.get("holder", "?") if current else "?"
                raise UserError(f"s3://{self.store.bucket}/{self.key} is still held by {holder} after "
                                f"{self.timeout_s:.0f}s; if that process is gone, delete the object")
            time.sleep(self.poll_s)

    def release(self) -> None:
        if self.etag:
            self.store.delete_if_match(self.key, self.etag)
            self.etag = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
