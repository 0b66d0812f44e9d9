"""Loopback networking for the embedded services: picking ports and probing HTTP endpoints."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Callable

LOOPBACK = "127.0.0.1"
# Loopback probes must never go through an HTTP proxy configured in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct TCP ports that nothing listens on right now."""
    with contextlib.ExitStack() as sockets:
        ports = []
        for _ in range(count):
            sock = sockets.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that nothing listens on right now."""
    return free_ports(1, host)[0]


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True if a server could bind host:port now (as servers do, ignoring TIME_WAIT leftovers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def http_ok(url: str) -> bool:
    """True if `url` answers GET with a 2xx status."""
    try:
        with _DIRECT.open(url, timeout=2) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_until(
    check: Callable[[], bool], what: str, timeout_s: float, process: subprocess.Popen | None = None
) -> None:
    """Poll `check` until it holds; TimeoutError after `timeout_s`, RuntimeError if `process` exits."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: process exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready within {timeout_s:.0f}s")
        time.sleep(0.25)

