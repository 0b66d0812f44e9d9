"""The embedded local stack: S3 (moto), MLflow server and Ray head as real processes on 127.0.0.1,
kept in one private directory (state.json, stack.env, aws-credentials, logs/, mlflow/, s3/); `up`
starts what is not running and reuses the rest, `down` stops exactly the recorded processes and,
with `purge`, deletes the S3 objects' snapshot (docs/design/stack.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import shlex
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from cluster import processes
from cluster.credentials import CREDENTIAL_VARIABLES, credentials_file_env, write_credentials_file
from cluster.mlflow_server import mlflow_server_healthy, start_mlflow_server
from cluster.net import LOOPBACK, free_port, port_is_free, wait_until
from cluster.private_files import (
    make_tree_private,
    open_private_append,
    private_directory,
    write_private_file,
)
from cluster.processes import ProcessId
from cluster.ray_head import (
    PORT_NAMES,
    dashboard_url,
    gcs_address,
    ray_client_env,
    ray_head_healthy,
    ray_session_logs,
    ray_temp_dir,
    start_ray_head,
)
from cluster.s3_server import REGION, create_buckets, s3_server_healthy, snapshot_header, start_s3_server
from infra.errors import UserError

SERVICES = ("s3", "mlflow", "ray")  # start order; `down` goes in reverse
HEALTH_TIMEOUT_S = 60  # for a service found running that does not answer yet
S3_STOP_TIMEOUT_S = 300  # the S3 server writes its last snapshot when stopped


@dataclass
class StackSettings:
    """What `vitae stack up` options set; a port of None is chosen free."""

    num_cpus: int = 8
    data_bucket: str = "vitae-data"
    checkpoint_bucket: str = "vitae-checkpoints"
    ray_auth: bool = True
    s3_snapshot_interval: int = 30  # seconds (at most 60: docs/design/s3.md)
    s3_port: int | None = None
    mlflow_port: int | None = None
    ray_port: int | None = None
    dashboard_port: int | None = None


@dataclass
class ServiceRecord:
    ports: dict[str, int]
    process: ProcessId | None = None  # None when not started by this stack or stopped


@dataclass
class StackState:
    settings: StackSettings
    secrets: dict[str, str]
    services: dict[str, ServiceRecord] = field(default_factory=dict)

    @classmethod
    def new(cls, settings: StackSettings) -> StackState:
        return cls(
            settings,
            {
                "aws_access_key_id": "VITAE" + secrets.token_hex(8).upper()[:15],
                "aws_secret_access_key": secrets.token_urlsafe(30),
                "ray_auth_token": secrets.token_hex(32),
            },
        )

    @classmethod
    def from_json(cls, data: dict) -> StackState:
        services = {
            name: ServiceRecord(record["ports"], ProcessId(**record["process"]) if record["process"] else None)
            for name, record in data["services"].items()
        }
        return cls(StackSettings(**data["settings"]), data["secrets"], services)

    def ports(self, name: str) -> dict[str, int]:
        return self.services[name].ports if name in self.services else {}


@dataclass(frozen=True)
class ObjectsOnDisk:
    """The S3 server's snapshot file: where, how large, when taken (None: no snapshot yet)."""

    path: Path
    size: int | None
    written: float | None


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    address: str
    pid: int | None
    state: str  # started | running (by `up`), healthy | unhealthy | stopped, or not running (by `down`)


def service_address(name: str, ports: Mapping[str, int]) -> str:
    if name == "ray":
        return f"{gcs_address(ports)} (jobs API {dashboard_url(ports)})"
    return f"http://{LOOPBACK}:{ports[name]}"


def service_healthy(name: str, ports: Mapping[str, int]) -> bool:
    if name == "ray":
        return ray_head_healthy(ports)
    check = s3_server_healthy if name == "s3" else mlflow_server_healthy
    return check(service_address(name, ports))


def ray_token(state: StackState) -> str | None:
    return state.secrets["ray_auth_token"] if state.settings.ray_auth else None


def choose_port(requested: int | None, previous: int | None, what: str, taken: set[int], keep: bool) -> int:
    """`requested` (which must be free), else the previous port if still free, else any free one.

    With `keep`, a previous port must be reused: something still running expects the service there.
    """
    if requested is not None:
        if requested in taken or not port_is_free(requested):
            raise UserError(f"port {requested} for {what} is in use; choose another or stop what uses it")
        port = requested
    elif previous is not None and previous not in taken and port_is_free(previous):
        port = previous
    elif previous is not None and keep:
        raise UserError(
            f"port {previous} of {what} is now taken by another process, and the running Ray head "
            "expects it there; run `vitae stack down` and `vitae stack up` to move the whole stack"
        )
    else:
        port = free_port()
        while port in taken:
            port = free_port()
    taken.add(port)
    return port


def _port_label(service: str, port_name: str) -> str:
    return service if port_name == service else f"{service} {port_name}"


class Stack:
    """One stack directory and the processes recorded in it."""

    def __init__(self, directory: Path):
        self.directory = directory.resolve()
        self.state_path = self.directory / "state.json"
        self.env_path = self.directory / "stack.env"
        self.credentials_path = self.directory / "aws-credentials"
        self.logs = self.directory / "logs"
        self.s3_snapshot = self.directory / "s3" / "objects.snapshot"
        self._saving = threading.Lock()

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    # --- what clients and Ray processes get ------------------------------------------------

    def client_env(self, state: StackState | None = None) -> dict[str, str]:
        """Everything a client needs (the exports of stack.env)."""
        state = state or self.load()
        return {**self.service_env(state), **ray_client_env(state.ports("ray"), ray_token(state))}

    def service_env(self, state: StackState) -> dict[str, str]:
        """The S3 and MLflow settings: clients get them, and so does every Ray process. The S3
        credentials are the stack's credentials file, never variables."""
        return {
            "AWS_ENDPOINT_URL_S3": service_address("s3", state.ports("s3")),
            **credentials_file_env(self.credentials_path),
            "AWS_DEFAULT_REGION": REGION,
            "VITAE_DATA_BUCKET": state.settings.data_bucket,
            "VITAE_CHECKPOINT_BUCKET": state.settings.checkpoint_bucket,
            "MLFLOW_TRACKING_URI": service_address("mlflow", state.ports("mlflow")),
        }

    def use_in_this_process(self) -> dict[str, str]:
        """Point this process (and what it starts) at the stack; returns the client environment."""
        env = self.client_env()
        for name in CREDENTIAL_VARIABLES:  # they would take precedence over the credentials file
            os.environ.pop(name, None)
        os.environ.update(env)
        return env

    # --- state -----------------------------------------------------------------------------

    def load(self) -> StackState | None:
        try:
            return StackState.from_json(json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{self.state_path} is not a stack state file ({error}); remove it") from None

    def save(self, state: StackState) -> None:
        with self._saving:
            write_private_file(self.state_path, json.dumps(dataclasses.asdict(state), indent=2))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the stack directory's lock (created if missing) for one command."""
        try:
            for directory in (self.directory, self.logs, self.directory / "mlflow", self.s3_snapshot.parent):
                private_directory(directory)
            lock = open_private_append(self.directory / ".lock")
        except OSError as error:
            raise UserError(f"cannot use {self.directory} as stack directory: {error.strerror}") from None
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"another `vitae stack` command is working on {self.directory}") from None
            yield

    # --- commands --------------------------------------------------------------------------

    def status(self) -> list[ServiceStatus]:
        state = self.load()
        if state is None:
            raise UserError(f"no stack in {self.directory}; start one with `vitae stack up --dir {self.directory}`")
        return [self._status(state, name) for name in SERVICES]

    def up(self, requested: Mapping[str, object]) -> list[ServiceStatus]:
        """Start what is not running, reuse what is; write stack.env. `requested`: StackSettings fields."""
        with self.locked():
            make_tree_private(self.directory)  # what an older version left readable
            state = self.load()
            running = set() if state is None else {n for n in SERVICES if self._is_running(state, n)}
            state = self._settle_settings(state, requested, running)
            to_start = [name for name in SERVICES if name not in running]
            for name in to_start:
                self._stop_leftovers(state, name)
            self._assign_ports(state, to_start, keep_previous="ray" in running)
            self.save(state)
            write_credentials_file(self.credentials_path, state.secrets["aws_access_key_id"],
                                   state.secrets["aws_secret_access_key"])
            for name in running:
                self._wait_healthy(state, name)
            self._start(state, to_start)
            create_buckets(
                service_address("s3", state.ports("s3")),
                [state.settings.data_bucket, state.settings.checkpoint_bucket],
                state.secrets["aws_access_key_id"],
                state.secrets["aws_secret_access_key"],
            )
            write_private_file(self.env_path, self._env_file(state))
            return [
                dataclasses.replace(self._status(state, name), state="started" if name in to_start else "running")
                for name in SERVICES
            ]

    def objects_on_disk(self) -> ObjectsOnDisk:
        try:
            size, header = self.s3_snapshot.stat().st_size, snapshot_header(self.s3_snapshot)
        except FileNotFoundError:
            return ObjectsOnDisk(self.s3_snapshot, None, None)
        return ObjectsOnDisk(self.s3_snapshot, size, header["written"])

    def down(self, purge: bool = False) -> list[ServiceStatus]:
        """Stop the recorded processes, Ray first; safe to repeat. Ports and credentials are kept,
        and so are the S3 objects (the server writes its snapshot as it stops) unless `purge`."""
        if not self.state_path.exists():
            return []
        with self.locked():
            state = self.load()
            stopped = []
            for name in reversed(SERVICES):
                record = state.services[name]
                pid = record.process.pid if record.process else None
                timeout_s = S3_STOP_TIMEOUT_S if name == "s3" else 30
                was_running = record.process is not None and processes.stop(record.process, timeout_s)
                record.process = None
                self.save(state)
                address = service_address(name, record.ports)
                stopped.append(ServiceStatus(name, address, pid, "stopped" if was_running else "not running"))
            self.env_path.unlink(missing_ok=True)
            self.credentials_path.unlink(missing_ok=True)
            if purge:
                for path in self.s3_snapshot.parent.iterdir():  # the snapshot and a partial one
                    path.unlink()
            return stopped

    # --- helpers ---------------------------------------------------------------------------

    def _is_running(self, state: StackState, name: str) -> bool:
        process = state.services[name].process
        return process is not None and processes.is_running(process)

    def _stop_leftovers(self, state: StackState, name: str) -> None:
        """A service whose main process died may leave children behind (holding its port): stop them."""
        record = state.services.get(name)
        if record is not None and record.process is not None:
            processes.stop(record.process)
            record.process = None

    def _status(self, state: StackState, name: str) -> ServiceStatus:
        record = state.services[name]
        address = service_address(name, record.ports)
        if not self._is_running(state, name):
            return ServiceStatus(name, address, None, "stopped")
        health = "healthy" if service_healthy(name, record.ports) else "unhealthy"
        return ServiceStatus(name, address, record.process.pid, health)

    def _settle_settings(
        self, state: StackState | None, requested: Mapping[str, object], running: set[str]
    ) -> StackState:
        given = {key: value for key, value in requested.items() if value is not None}
        if state is None:
            return StackState.new(StackSettings(**given))
        changed = {key: value for key, value in given.items() if getattr(state.settings, key) != value}
        if changed and running:
            key = next(iter(changed))
            raise UserError(
                f"the stack in {self.directory} is running with {key}={getattr(state.settings, key)}; "
                f"run `vitae stack down --dir {self.directory}` before changing it"
            )
        state.settings = dataclasses.replace(state.settings, **changed)
        return state

    def _assign_ports(self, state: StackState, names: list[str], keep_previous: bool) -> None:
        """Choose every port before anything starts, so that a busy port fails the whole `up`.

        `keep_previous` while the Ray head runs: it gave its workers the S3 and MLflow addresses.
        """
        settings = state.settings
        requested = {
            "s3": {"s3": settings.s3_port},
            "mlflow": {"mlflow": settings.mlflow_port},
            "ray": {"port": settings.ray_port, "dashboard-port": settings.dashboard_port},
        }
        port_names = {"s3": ("s3",), "mlflow": ("mlflow",), "ray": PORT_NAMES}
        taken = {port for name in SERVICES if name not in names for port in state.ports(name).values()}
        for name in names:
            previous, ports = state.ports(name), {}
            for port in port_names[name]:
                label = _port_label(name, port)
                ports[port] = choose_port(requested[name].get(port), previous.get(port), label, taken, keep_previous)
            state.services[name] = ServiceRecord(ports)

    def _wait_healthy(self, state: StackState, name: str) -> None:
        try:
            wait_until(lambda: service_healthy(name, state.ports(name)), name, HEALTH_TIMEOUT_S)
        except TimeoutError:
            raise UserError(
                f"{name} is running but not answering; see {self.log_path(name)}, "
                f"or restart it with `vitae stack down --dir {self.directory}` and `up`"
            ) from None

    def _start(self, state: StackState, names: list[str]) -> None:
        """Start `names` side by side; record each as it comes up; fail naming the first that did not."""
        with ThreadPoolExecutor(max_workers=len(SERVICES)) as pool:
            futures = {name: pool.submit(self._start_one, state, name) for name in names}
        for name, future in futures.items():
            if future.exception() is not None:
                raise UserError(f"{name} failed to start ({future.exception()}); see {self.log_path(name)}")

    def _start_one(self, state: StackState, name: str) -> None:
        ports, log = state.ports(name), self.log_path(name)
        if name == "s3":
            process = start_s3_server(port=ports["s3"], log_path=log, detach=True, snapshot=self.s3_snapshot,
                                      snapshot_interval_s=state.settings.s3_snapshot_interval).process
        elif name == "mlflow":
            process = start_mlflow_server(self.directory / "mlflow", ports["mlflow"], log).process
        else:
            temp_dir = ray_temp_dir(self.directory)
            self._link_ray_logs(temp_dir)
            worker_env = self.service_env(state)
            head = start_ray_head(ports, state.settings.num_cpus, ray_token(state), temp_dir, log, worker_env)
            process = head.process
        state.services[name].process = processes.identify(process.pid)
        self.save(state)

    def _link_ray_logs(self, temp_dir: Path) -> None:
        link = self.logs / "ray-session"
        if link.is_symlink() and link.readlink() != ray_session_logs(temp_dir):
            link.unlink()  # made by an older version, for another layout
        if not link.is_symlink():
            link.symlink_to(ray_session_logs(temp_dir))

    def _env_file(self, state: StackState) -> str:
        lines = [
            f"# The vitae local stack in {self.directory}, written by `vitae stack up`.",
            f"# Load it with:  source {self.env_path}",
            "# It holds the Ray token: keep it private. S3 credentials are in the file it names, and",
            "# credential variables are unset: they would take precedence over that file.",
            f"unset {' '.join(CREDENTIAL_VARIABLES)}",
        ]
        lines += [f"export {key}={shlex.quote(value)}" for key, value in self.client_env(state).items()]
        return "\n".join(lines) + "\n"
