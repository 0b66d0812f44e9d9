"""What processes listen on: every TCP socket in LISTEN state held by a process tree (psutil), for
the tests that every service binds to loopback only."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import ray  # noqa: F401  (puts the psutil that Ray bundles, ray/thirdparty_files, on sys.path)
import psutil

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Listener:
    """One listening socket and the process that holds it."""

    process: str
    pid: int
    address: Address
    port: int

    def __str__(self) -> str:
        return f"{self.process} (pid {self.pid}) on {self.address} port {self.port}"


def process_tree(pid: int) -> list[psutil.Process]:
    """`pid` and its living descendants (none if it has exited)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def listeners(pids: Iterable[int]) -> list[Listener]:
    """The listening TCP sockets of the process trees of `pids`."""
    processes = {process.pid: process for pid in pids for process in process_tree(pid)}
    found = []
    for process in processes.values():
        try:
            name, sockets = _label(process), process.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):  # exited meanwhile
            continue
        found += [Listener(name, process.pid, ipaddress.ip_address(socket.laddr.ip), socket.laddr.port)
                  for socket in sockets if socket.status == psutil.CONN_LISTEN]
    return found


def _label(process: psutil.Process) -> str:
    """The executable's name, or for Python the module or script it runs (moto, dashboard.py, ...)."""
    name = process.name()
    if not name.startswith("python"):
        return name  # gcs_server, raylet, ray::IDLE, ray::DashboardAgent, ...
    args = process.cmdline()[1:]
    if "-m" in args[:-1]:
        return f"python -m {args[args.index('-m') + 1]}"
    return f"python {Path(next((arg for arg in args if not arg.startswith('-')), '')).name}"


def is_loopback(address: Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def not_on_loopback(found: Iterable[Listener]) -> list[str]:
    """Each listener bound to another address than loopback (0.0.0.0 and :: included), named."""
    return [str(listener) for listener in found if not is_loopback(listener.address)]
