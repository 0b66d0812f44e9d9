"""The embedded S3 server's snapshots (`cluster.s3_snapshots`), on servers of these tests' own: the
objects survive a stop and a SIGKILL (less the writes after the last snapshot), snapshots taken
under concurrent writes hold whole objects only, and what the stack's S3 users rely on (conditional
writes and deletes, multipart uploads, ranged reads) works on restored objects."""

from __future__ import annotations

import hashlib
import io
import itertools
import threading
import time
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from cluster import processes
from cluster.s3_server import REGION, S3Server, snapshot_header, start_s3_server
from infra.s3 import S3Config, make_client
from tests.support.waiting import wait_for

pytestmark = pytest.mark.services  # starts S3 servers of its own

BUCKET = "snapshot-test"
MiB = 1024 * 1024
MULTIPART = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)


def start(tmp_path: Path, interval_s: float = 30) -> S3Server:
    return start_s3_server(log_path=tmp_path / "s3.log", snapshot=tmp_path / "objects.snapshot",
                           snapshot_interval_s=interval_s)


def client(server: S3Server):
    return make_client(S3Config(endpoint_url=server.endpoint, region=REGION), key_pair=("snapshot", "test"))


def contents(s3) -> dict[str, str]:
    """Key -> ETag of every object in the bucket."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {item["Key"]: item["ETag"] for page in pages for item in page.get("Contents", [])}


def wait_for_snapshot(s3, directory: Path) -> None:
    """Until a snapshot holds every write made before this call: one taken after it (a marker
    written now makes sure that one comes)."""
    called = time.time()
    s3.put_object(Bucket=BUCKET, Key="marker", Body=b"")
    wait_for(lambda: (snapshot_header(directory / "objects.snapshot") or {"written": 0})["written"] > called, 30,
             "a snapshot of the writes", lambda: (directory / "s3.log").read_text()[-2000:])


def error_code(call) -> str:
    with pytest.raises(ClientError) as error:
        call()
    return error.value.response["Error"]["Code"]


def test_objects_survive_a_stop_and_conditional_writes_multipart_and_ranges_work_on_them(tmp_path):
    big = bytes(itertools.islice(itertools.cycle(range(251)), 12 * MiB + 123))
    server = start(tmp_path)
    try:
        s3 = client(server)
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="small", Body=b"hello")
        s3.upload_fileobj(io.BytesIO(big), BUCKET, "big", Config=MULTIPART)  # three parts
        pending = s3.create_multipart_upload(Bucket=BUCKET, Key="pending")["UploadId"]
        first = s3.upload_part(Bucket=BUCKET, Key="pending", UploadId=pending, PartNumber=1, Body=big[:5 * MiB])
        before = contents(s3)
    finally:
        server.stop()  # SIGTERM: the last snapshot
    server = start(tmp_path)
    try:
        s3 = client(server)
        assert contents(s3) == before and before["big"].endswith('-3"')  # the multipart ETag, kept
        assert s3.get_object(Bucket=BUCKET, Key="big")["Body"].read() == big
        ranged = s3.get_object(Bucket=BUCKET, Key="big", Range=f"bytes={6 * MiB}-{6 * MiB + 99}")["Body"].read()
        assert ranged == big[6 * MiB:6 * MiB + 100]
        # conditional puts and deletes (the lease): against restored ETags
        assert error_code(lambda: s3.put_object(Bucket=BUCKET, Key="small", Body=b"x", IfNoneMatch="*")) == \
            "PreconditionFailed"
        assert error_code(lambda: s3.put_object(Bucket=BUCKET, Key="small", Body=b"x", IfMatch='"0"')) == \
            "PreconditionFailed"
        changed = s3.put_object(Bucket=BUCKET, Key="small", Body=b"changed", IfMatch=before["small"])["ETag"]
        s3.put_object(Bucket=BUCKET, Key="new", Body=b"new", IfNoneMatch="*")
        s3.delete_object(Bucket=BUCKET, Key="small", IfMatch=changed)
        # a multipart upload begun before the restart completes after it
        second = s3.upload_part(Bucket=BUCKET, Key="pending", UploadId=pending, PartNumber=2, Body=b"end")
        s3.complete_multipart_upload(Bucket=BUCKET, Key="pending", UploadId=pending, MultipartUpload={"Parts": [
            {"PartNumber": 1, "ETag": first["ETag"]}, {"PartNumber": 2, "ETag": second["ETag"]}]})
        assert s3.get_object(Bucket=BUCKET, Key="pending")["Body"].read() == big[:5 * MiB] + b"end"
        assert set(contents(s3)) == {"big", "new", "pending"}
    finally:
        server.stop()


def test_a_killed_server_loses_only_the_writes_after_its_last_snapshot(tmp_path):
    server = start(tmp_path, interval_s=0.5)
    try:
        s3 = client(server)
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="before", Body=b"kept")
        wait_for_snapshot(s3, tmp_path)
    finally:
        processes.kill_child(server.process)  # SIGKILL: no last snapshot
    server = start(tmp_path, interval_s=60)
    try:
        s3 = client(server)
        assert s3.get_object(Bucket=BUCKET, Key="before")["Body"].read() == b"kept"
        s3.put_object(Bucket=BUCKET, Key="after", Body=b"lost")  # no snapshot for 60 s
    finally:
        processes.kill_child(server.process)
    server = start(tmp_path)
    try:
        assert set(contents(client(server))) == {"before", "marker"}
    finally:
        server.stop()


def test_snapshots_taken_under_concurrent_writes_hold_whole_objects(tmp_path):
    """Four writers (plain puts and multipart uploads) while the server snapshots every 0.2 s; after a
    SIGKILL, every restored object is complete and its ETag matches its content."""
    server = start(tmp_path, interval_s=0.2)
    stop = threading.Event()
    written: dict[str, bytes] = {}

    def body(key: str) -> bytes:
        size = 6 * MiB if key.endswith("0") else 1000 + len(written) % 5000
        return hashlib.sha256(key.encode()).digest() * (size // 32)

    def writer(number: int) -> None:
        s3 = client(server)
        for index in itertools.count():
            if stop.is_set():
                return
            key = f"w{number}/{index}"
            data = body(key)
            s3.upload_fileobj(io.BytesIO(data), BUCKET, key, Config=MULTIPART)
            written[key] = data

    try:
        client(server).create_bucket(Bucket=BUCKET)
        threads = [threading.Thread(target=writer, args=(number,)) for number in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(written) >= 40 and (tmp_path / "objects.snapshot").exists(), 60, "40 objects written",
                 lambda: (tmp_path / "s3.log").read_text()[-2000:])
        stop.set()
        for thread in threads:
            thread.join()
    finally:
        stop.set()
        processes.kill_child(server.process)
    snapshots = (tmp_path / "s3.log").read_text().count("snapshot: ")
    server = start(tmp_path)
    try:
        s3 = client(server)
        restored = contents(s3)
        assert restored and set(restored) <= set(written) and snapshots >= 2, (len(restored), snapshots)
        for key in restored:
            data = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            assert data == written[key], key
        multipart = [key for key in restored if key.endswith("0")]
        assert multipart and all(restored[key].endswith('-2"') for key in multipart)
    finally:
        server.stop()


def test_an_unreadable_snapshot_stops_the_server_and_is_kept(tmp_path):
    snapshot = tmp_path / "objects.snapshot"
    snapshot.write_bytes(b"not a snapshot")
    with pytest.raises(RuntimeError, match="process exited"):
        start(tmp_path)
    assert snapshot.read_bytes() == b"not a snapshot"
    assert f"cannot restore the S3 objects from {snapshot}" in (tmp_path / "s3.log").read_text()
