"""Benchmark of the embedded S3 server's snapshots (`cluster.s3_snapshots`), each beside a baseline
from the same run:

- a snapshot: the seconds the server takes to write its objects to disk when it stops (as it
  reports them in its log, and how long requests were held back), beside writing and fsyncing the
  same number of bytes to a file;
- a restore: the seconds until a server that restores that snapshot answers, beside starting a
  server with no snapshot.

Run from the repository root: `python -m benchmarks.s3_snapshots [--objects 20 --mib 10]`. The last
line is the headline ratio.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import tempfile
from pathlib import Path

from boto3.s3.transfer import TransferConfig

from benchmarks.report import print_table, timed
from cluster.s3_server import REGION, start_s3_server
from infra.s3 import S3Config, make_client

BUCKET = "snapshot-bench"
SNAPSHOT_LINE = re.compile(r"snapshot: (\d+) bytes written to \S+ in ([\d.]+) s \(requests held back ([\d.]+) s\)")


def fill(work: Path, objects: int, mib: int) -> None:
    """A server with `objects` random objects of `mib` MiB (multipart uploads), stopped: its last snapshot."""
    server = start_s3_server(log_path=work / "s3.log", snapshot=work / "objects.snapshot", snapshot_interval_s=600)
    try:
        client = make_client(S3Config(endpoint_url=server.endpoint, region=REGION), key_pair=("bench", "bench"))
        client.create_bucket(Bucket=BUCKET)
        for index in range(objects):
            client.upload_fileobj(io.BytesIO(os.urandom(mib * 2**20)), BUCKET, f"object-{index}",
                                  Config=TransferConfig(multipart_threshold=8 * 2**20, multipart_chunksize=8 * 2**20))
    finally:
        server.stop()


def write_and_fsync(path: Path, size: int) -> None:
    block = os.urandom(2**20)
    with path.open("wb") as file:
        for _ in range(size // len(block)):
            file.write(block)
        file.write(block[:size % len(block)])
        file.flush()
        os.fsync(file.fileno())


def started(work: Path, snapshot: Path | None) -> None:
    start_s3_server(log_path=work / "start.log", snapshot=snapshot).stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=20)
    parser.add_argument("--mib", type=int, default=10, help="size of each object in MiB")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="snapshot-bench-") as tmp:
        work = Path(tmp)
        fill(work, args.objects, args.mib)
        size, snapshot_s, held_s = (float(value) for value in SNAPSHOT_LINE.findall((work / "s3.log").read_text())[-1])
        write_s, _ = timed(lambda: write_and_fsync(work / "baseline", int(size)))
        restore_s, _ = timed(lambda: started(work, work / "objects.snapshot"))
        empty_s, _ = timed(lambda: started(work, None))

    rows = [
        ("measure", "snapshots", "baseline", "ratio"),
        (f"write {size / 2**20:.0f} MiB ({args.objects} objects)", f"{snapshot_s:.2f} s (held back {held_s:.2f} s)",
         f"{write_s:.2f} s (file write + fsync)", f"{snapshot_s / write_s:.2f}x"),
        ("start, restoring it", f"{restore_s:.2f} s", f"{empty_s:.2f} s (no snapshot)", f"{restore_s / empty_s:.2f}x"),
    ]
    print_table(f"the embedded S3 server's snapshot of {args.objects} objects of {args.mib} MiB", rows,
                f"snapshot time = {snapshot_s / write_s:.2f}x writing and fsyncing the same bytes")


if __name__ == "__main__":
    main()
