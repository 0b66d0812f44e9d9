"""The service processes the stack starts: launching them detached, recognising them (PID, start
time and command line, through psutil), stopping them with their descendants
(docs/design/stack.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import psutil

from cluster.private_files import PRIVATE_UMASK, open_private_append


@dataclass(frozen=True)
class ProcessId:
    """One process as recorded in the stack state: PID, start time and command line."""

    pid: int
    started: str
    command: str


def _identity(process: psutil.Process) -> ProcessId:
    with process.oneshot():
        return ProcessId(process.pid, f"{process.create_time():.2f}", " ".join(process.cmdline()))


def _living(process: psutil.Process) -> bool:
    """Still running, not a zombie, and not a later process given the same PID."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _current(pid: int) -> psutil.Process | None:
    """The living process with this PID now, whoever it is."""
    try:
        found = psutil.Process(pid)
    except psutil.Error:
        return None
    return found if _living(found) else None


def _is(found: psutil.Process, process: ProcessId) -> bool:
    try:
        return _identity(found) == process
    except psutil.Error:
        return False


def _family(leader: int) -> list[psutil.Process]:
    """The living members of `leader`'s process group and all their descendants."""
    members: dict[int, psutil.Process] = {}
    for candidate in psutil.process_iter():
        try:
            if candidate.pid == leader or os.getpgid(candidate.pid) == leader:
                members[candidate.pid] = candidate
        except (OSError, psutil.Error):
            continue
    for member in list(members.values()):
        try:
            for child in member.children(recursive=True):
                members.setdefault(child.pid, child)
        except psutil.Error:
            continue
    return [member for member in members.values() if _living(member)]


def launch(
    argv: list[str], log_path: Path | None, env: Mapping[str, str] | None = None, detach: bool = True
) -> subprocess.Popen:
    """Start `argv` with umask 077, output appended to `log_path` (a private file) or discarded.

    `detach` starts it in a new session: it outlives the caller, and a terminal's Ctrl-C does not
    reach it.
    """
    with open_private_append(log_path) if log_path else open(os.devnull, "ab") as log:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            start_new_session=detach,
            umask=PRIVATE_UMASK,
        )


def identify(pid: int) -> ProcessId:
    """The identity of running process `pid` (LookupError if there is none)."""
    found = _current(pid)
    if found is None:
        raise LookupError(f"no running process {pid}")
    return _identity(found)


def is_running(process: ProcessId) -> bool:
    """True if `process` still runs: same PID, start time and command line."""
    found = _current(process.pid)
    return found is not None and _is(found, process)


def _wait_gone(processes: Iterable[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until none of `processes` is alive; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        living = [process for process in processes if _living(process)]
        if not living or time.monotonic() > deadline:
            return living
        time.sleep(0.2)


def _signal(processes: Iterable[psutil.Process], signum: int) -> None:
    for process in processes:
        try:
            process.send_signal(signum)  # psutil refuses a PID that now names another process
        except psutil.Error:
            pass


def stop(process: ProcessId, timeout_s: float = 30) -> bool:
    """Stop `process`, its process group and its descendants; False if none of them was running.

    The leader gets SIGTERM first so that it can shut its own children down; whatever is left of
    the family then gets SIGTERM, and SIGKILL if still alive after `timeout_s`. If the leader has
    died, surviving members of its group are still stopped: the system does not reuse a PID while
    a process group of that number exists. If the PID now names an unrelated process, nothing is
    signalled.
    """
    found = _current(process.pid)
    if found is not None and not _is(found, process):
        return False
    family = _family(process.pid)
    leader = [member for member in family if member.pid == process.pid]
    _signal(leader, signal.SIGTERM)
    _wait_gone(leader, timeout_s)
    leftovers = list({member.pid: member for member in family + _family(process.pid)
                      if member.pid != process.pid}.values())
    _signal(leftovers, signal.SIGTERM)
    survivors = _wait_gone(leftovers + leader, timeout_s)
    _signal(survivors, signal.SIGKILL)
    _wait_gone(survivors, 5)
    return bool(family)


def kill_child(child: subprocess.Popen) -> None:
    """SIGKILL a service that this process launched and its whole family at once, the way a machine
    failure ends them (no process gets to shut down), and reap it."""
    family = _family(child.pid)
    _signal(family, signal.SIGKILL)
    _wait_gone(family, 5)
    child.wait()


def stop_child(child: subprocess.Popen, timeout_s: float = 30) -> None:
    """Stop a service that this process launched, with its family, and reap it."""
    found = _current(child.pid)
    if found is not None:
        stop(_identity(found), timeout_s)
    child.wait()
