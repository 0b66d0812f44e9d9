"""The object-storage lease on the real S3 server: exclusion, expiry, dead and live holders, renewal."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid

import pytest

from infra.errors import UserError
from infra.lease import Lease
from infra.object_store import ObjectStore
from infra.s3 import S3Config
from tests.support.s3_fault_proxy import FaultProxy
from tests.support.waiting import wait_for


@pytest.fixture(scope="module")
def lock_store(s3_endpoint):
    store = ObjectStore("vitae-test-leases")
    store.client.create_bucket(Bucket=store.bucket)
    return store


def test_lease_excludes_and_breaks_expired_holders(lock_store):
    key = f"locks/{uuid.uuid4().hex}"
    with Lease(lock_store, key):
        with pytest.raises(UserError, match="still held by"):
            Lease(lock_store, key, timeout_s=0.5, poll_s=0.1).acquire()
    abandoned = Lease(lock_store, key, ttl_s=0.2).acquire()  # its holder "dies" without releasing
    time.sleep(0.4)
    successor = Lease(lock_store, key, timeout_s=2).acquire()
    assert successor.etag != abandoned.etag
    abandoned.release()  # no longer ours: must not delete the successor's lease
    assert lock_store.head(key) is not None
    successor.release()
    assert lock_store.head(key) is None


def foreign_lease(store: ObjectStore, key: str, ttl_s: float = 60) -> None:
    """A lease held by a live process of another host (as its metadata says)."""
    assert store.put_if_absent(key, b"x", {"holder": "other-host:4242", "host": "other-host", "pid": "4242",
                                           "pid-started": "1.00", "expires-at": f"{time.time() + ttl_s:.3f}"})


def test_a_lease_of_a_live_holder_elsewhere_blocks_and_is_reported(lock_store):
    key = f"locks/{uuid.uuid4().hex}"
    foreign_lease(lock_store, key)
    reports: list[str] = []
    started = time.monotonic()
    with pytest.raises(UserError, match=r"still held by other-host:4242 \(until .*\) after 2s"):
        Lease(lock_store, key, timeout_s=2, poll_s=0.1, report=reports.append).acquire()
    assert time.monotonic() - started >= 2
    assert reports == [f"waiting for s3://{lock_store.bucket}/{key}: held by " + reports[0].split("held by ")[1]]
    assert reports[0].split("held by ")[1].startswith("other-host:4242 (until ")
    with pytest.raises(UserError, match=r"^s3://\S+ is held by other-host:4242 \(until "):
        Lease(lock_store, key, timeout_s=0).acquire()  # refused at once
    assert lock_store.head(key).metadata["holder"] == "other-host:4242"


def test_a_held_lease_is_renewed_beyond_its_ttl_and_learns_when_it_is_lost(lock_store):
    key = f"locks/{uuid.uuid4().hex}"
    with Lease(lock_store, key, ttl_s=1.0) as held:
        first_expiry = float(lock_store.head(key).metadata["expires-at"])
        wait_for(lambda: time.time() > first_expiry + 1.0, 10, "the first TTL passed")
        with pytest.raises(UserError, match="is held by .*:%d " % os.getpid()):
            Lease(lock_store, key, timeout_s=0).acquire()  # renewed: not expired, not breakable
        held.check()
    assert lock_store.head(key) is None

    with pytest.raises(UserError, match="taken over or deleted while held"):
        with Lease(lock_store, key, ttl_s=1.0) as held:
            lock_store.delete(key)  # broken by someone else
            wait_for(lambda: held.lost is not None, 10, "the renewal noticed the loss")
    assert lock_store.head(key) is None  # not silently taken again


def answer_lost_once(method: str, key: str):
    """A `FaultProxy.lose_answer` predicate: the first `method` request to `key` only."""
    lost: list[str] = []

    def pick(request_method: str, path: str) -> bool:
        if request_method == method and path.split("?")[0].endswith(key) and not lost:
            lost.append(path)
            return True
        return False

    return pick


@pytest.mark.parametrize("method", ["acquire", "renew"])
def test_a_lease_whose_answer_was_lost_is_still_ours(lock_store, s3_endpoint, method):
    """The conditional write reached the server, its answer did not: botocore retries it, the retry
    finds the key taken (412), and the lease must recognise its own holding, not another holder."""
    proxy = FaultProxy(s3_endpoint).start()
    try:
        store = ObjectStore(lock_store.bucket, dataclasses.replace(S3Config.from_env(), endpoint_url=proxy.endpoint))
        key = f"locks/{uuid.uuid4().hex}"
        lease = Lease(store, key, ttl_s=30, timeout_s=0)
        if method == "acquire":
            proxy.lose_answer = answer_lost_once("PUT", key)
            lease.acquire()
        else:
            lease.acquire()
            proxy.lose_answer = answer_lost_once("PUT", key)
            assert lease.renew(), lease.lost
        assert proxy.injected("answer lost") == 1
        assert lease.etag == lock_store.head(key).etag
        lease.release()
        assert lock_store.head(key) is None
    finally:
        proxy.stop()
