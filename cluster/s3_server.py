"""The embedded S3 endpoint: a moto server in its own process on loopback (`cluster.s3_snapshots`:
objects in its memory, kept in a snapshot file when one is given), and `create_buckets`, which
provisions the buckets the stack hands out. See docs/design/s3.md.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster import processes
from cluster.net import LOOPBACK, free_port, http_ok, wait_until
from infra.s3 import S3Config, make_client

REGION = "us-east-1"  # moto ignores regions; clients still need one
SNAPSHOT_FORMAT = 1  # a snapshot file: this header (a dict), then moto's S3 backends, two pickles


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 120) -> None:
        """SIGTERM (the server writes its last snapshot), SIGKILL after `timeout_s`."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_s3_server(
    host: str = LOOPBACK,
    port: int | None = None,
    log_path: Path | None = None,
    detach: bool = False,
    snapshot: Path | None = None,
    snapshot_interval_s: float = 30,
    timeout_s: float = 120,
) -> S3Server:
    """Start the S3 server on host:port (a free port by default) and wait until it answers.

    With `snapshot`, it first restores the objects from that file (if it exists) and writes them back
    every `snapshot_interval_s` when something changed, and when it stops. `detach=True` starts it in
    a new session so that it outlives the calling command.
    """
    port = port or free_port(host)
    argv = [sys.executable, "-m", "cluster.s3_snapshots", "--host", host, "--port", str(port)]
    if snapshot is not None:
        argv += ["--snapshot", str(snapshot), "--interval", f"{snapshot_interval_s:g}"]
    process = processes.launch(argv, log_path, detach=detach)
    endpoint = f"http://{host}:{port}"
    try:
        wait_until(lambda: s3_server_healthy(endpoint), f"S3 server at {endpoint}", timeout_s, process)
    except BaseException:
        S3Server(endpoint, process).stop()
        raise
    return S3Server(endpoint, process)


def snapshot_header(path: Path) -> dict | None:
    """A snapshot's header: format, moto version, `written` (when it was taken); None if there is
    no snapshot. Reading it loads no moto class."""
    try:
        with path.open("rb") as file:
            return pickle.load(file)
    except FileNotFoundError:
        return None


def s3_server_healthy(endpoint: str) -> bool:
    return http_ok(f"{endpoint}/moto-api/")


def create_buckets(endpoint: str, buckets: list[str], access_key: str, secret_key: str) -> None:
    """Create each bucket that does not exist yet on the S3 server at `endpoint`, with the given keys.

    The caller's AWS settings play no part: an `AWS_PROFILE` of the shell (which need not exist in
    its config file) is not looked up."""
    client = make_client(S3Config(endpoint_url=endpoint, region=REGION), key_pair=(access_key, secret_key))
    existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
    for bucket in sorted(set(buckets) - existing):
        client.create_bucket(Bucket=bucket)
