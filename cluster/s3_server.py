"""The embedded S3 endpoint: a moto server in its own process on loopback (objects in its memory,
gone when it stops), and `create_buckets`, which provisions the buckets the stack hands out.
See docs/design/s3.md.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster import processes
from cluster.net import LOOPBACK, free_port, http_ok, wait_until
from infra.s3 import S3Config, make_client

REGION = "us-east-1"  # moto ignores regions; clients still need one


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 10) -> None:
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
    timeout_s: float = 30,
) -> S3Server:
    """Start `moto.server` on host:port (a free port by default) and wait until it answers.

    `detach=True` starts it in a new session so that it outlives the calling command.
    """
    port = port or free_port(host)
    argv = [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)]
    process = processes.launch(argv, log_path, detach=detach)
    endpoint = f"http://{host}:{port}"
    try:
        wait_until(lambda: s3_server_healthy(endpoint), f"S3 server at {endpoint}", timeout_s, process)
    except BaseException:
        S3Server(endpoint, process).stop()
        raise
    return S3Server(endpoint, process)


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
