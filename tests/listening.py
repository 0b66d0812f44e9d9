"""What processes listen on (Linux /proc), for the tests that every service binds to loopback only."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterable

LISTEN = "0A"  # TCP state in /proc/net/tcp*


def descendants(pid: int) -> set[int]:
    """`pid`'s living child processes, their children, and so on."""
    listing = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,stat="], capture_output=True, text=True,
                             check=True).stdout.split()
    children: dict[int, list[int]] = {}
    for child, parent, stat in zip(listing[0::3], listing[1::3], listing[2::3]):
        if not stat.startswith("Z"):
            children.setdefault(int(parent), []).append(int(child))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def listening_addresses(pids: Iterable[int]) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            with contextlib.suppress(OSError):  # the process or descriptor may be gone by now
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
    addresses = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                address, port = fields[1].split(":")
                addresses.append((_address(address, family), int(port, 16)))
    return addresses


def is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def _address(hex_words: str, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp* prints an address as 32-bit words in host byte order."""
    raw = bytes.fromhex(hex_words)
    step = -1 if sys.byteorder == "little" else 1
    packed = b"".join(raw[start:start + 4][::step] for start in range(0, len(raw), 4))
    return ipaddress.ip_address(socket.inet_ntop(family, packed))
