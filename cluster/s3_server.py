"""The embedded S3 endpoint: a moto server in its own process, bound to loopback.

Objects live in that process's memory: they are gone when it stops. Ray workers and other
processes reach it over HTTP like any S3 endpoint, which an in-process mock could not offer.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Block until `url` answers any HTTP status, or raise TimeoutError (RuntimeError if it died)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with code {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # the server answered, even if with an error status
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")


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
    host: str = "127.0.0.1",
    port: int | None = None,
    log_path: Path | None = None,
    detach: bool = False,
    timeout_s: float = 30,
) -> S3Server:
    """Start `moto.server` on host:port (a free port by default) and wait until it answers.

    `detach=True` starts it in a new session so that it outlives the calling command.
    """
    port = port or free_port(host)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=detach,
    )
    endpoint = f"http://{host}:{port}"
    try:
        wait_for_http(f"{endpoint}/moto-api/", timeout_s, process)
    except BaseException:
        S3Server(endpoint, process).stop()
        raise
    return S3Server(endpoint, process)
