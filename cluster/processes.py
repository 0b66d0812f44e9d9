"""The service processes the stack starts: launching them detached, recognising them, stopping them.

A process is recognised by its PID together with its start time and command line as `ps` reports
them, so a PID that the system has since handed to an unrelated process is never signalled. Each
service runs with umask 077 (see `private_files`), normally as the leader of its own session; stopping it
stops that process group and every descendant that left the group (Ray gives each worker a process
group of its own).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from cluster.private_files import PRIVATE_UMASK, open_private_append
from data_prep.errors import UserError


@dataclass(frozen=True)
class ProcessId:
    """One process as recorded in the stack state: PID, start time and command line."""

    pid: int
    started: str
    command: str


@dataclass(frozen=True)
class _Row:
    id: ProcessId
    ppid: int
    pgid: int
    zombie: bool


def _process_table() -> dict[int, _Row]:
    try:
        listing = subprocess.run(
            ["ps", "-A", "-ww", "-o", "pid=,ppid=,pgid=,stat=,lstart=,args="],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "LC_ALL": "C"},
        ).stdout
    except FileNotFoundError:
        raise UserError("the `ps` command is missing; install it (Debian/Ubuntu: apt-get install procps)") from None
    table = {}
    for line in listing.splitlines():
        fields = line.split(None, 9)  # pid ppid pgid stat, five words of lstart, then the command
        if len(fields) < 9:
            continue
        pid, ppid, pgid, stat = fields[:4]
        process = ProcessId(int(pid), " ".join(fields[4:9]), fields[9] if len(fields) == 10 else "")
        table[process.pid] = _Row(process, int(ppid), int(pgid), stat.startswith("Z"))
    return table


def _alive(table: dict[int, _Row], process: ProcessId) -> bool:
    row = table.get(process.pid)
    return row is not None and not row.zombie and row.id.started == process.started


def _running(table: dict[int, _Row], process: ProcessId) -> bool:
    return _alive(table, process) and table[process.pid].id.command == process.command


def _family(table: dict[int, _Row], leader: int) -> set[ProcessId]:
    """The living members of `leader`'s process group and all their descendants."""
    pids = {pid for pid, row in table.items() if row.pgid == leader or pid == leader}
    while True:
        children = {pid for pid, row in table.items() if row.ppid in pids} - pids
        if not children:
            break
        pids |= children
    return {table[pid].id for pid in pids if not table[pid].zombie}


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
    row = _process_table().get(pid)
    if row is None or row.zombie:
        raise LookupError(f"no running process {pid}")
    return row.id


def is_running(process: ProcessId) -> bool:
    """True if `process` still runs: same PID, start time and command line."""
    return _running(_process_table(), process)


def _wait_gone(processes: Iterable[ProcessId], timeout_s: float) -> set[ProcessId]:
    """Wait until none of `processes` is alive; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        table = _process_table()
        living = {process for process in processes if _alive(table, process)}
        if not living or time.monotonic() > deadline:
            return living
        time.sleep(0.2)


def _signal(processes: Iterable[ProcessId], signum: int) -> None:
    for process in processes:
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            pass


def stop(process: ProcessId, timeout_s: float = 30) -> bool:
    """Stop `process`, its process group and its descendants; False if none of them was running.

    The leader gets SIGTERM first so that it can shut its own children down; whatever is left of
    the family then gets SIGTERM, and SIGKILL if still alive after `timeout_s`. If the leader has
    died, surviving members of its group are still stopped: the system does not reuse a PID while
    a process group of that number exists. If the PID now names an unrelated process, nothing is
    signalled.
    """
    table = _process_table()
    if process.pid in table and not table[process.pid].zombie and not _running(table, process):
        return False
    family = _family(table, process.pid)
    if process in family:
        _signal([process], signal.SIGTERM)
        _wait_gone([process], timeout_s)
    leftovers = (family | _family(_process_table(), process.pid)) - {process}
    _signal(leftovers, signal.SIGTERM)
    survivors = _wait_gone(leftovers | (family & {process}), timeout_s)
    _signal(survivors, signal.SIGKILL)
    _wait_gone(survivors, 5)
    return bool(family)


def kill_child(child: subprocess.Popen) -> None:
    """SIGKILL a service that this process launched and its whole family at once, the way a machine
    failure ends them (no process gets to shut down), and reap it."""
    table = _process_table()
    family = _family(table, child.pid) if child.pid in table else set()
    _signal(family, signal.SIGKILL)
    _wait_gone(family, 5)
    child.wait()


def stop_child(child: subprocess.Popen, timeout_s: float = 30) -> None:
    """Stop a service that this process launched, with its family, and reap it."""
    table = _process_table()
    if child.pid in table:
        stop(table[child.pid].id, timeout_s)
    child.wait()
