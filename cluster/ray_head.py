"""The embedded Ray head (`ray start --head --block`, token authentication), and worker nodes that
join it on the same machine: loopback or multi-node, a token per cluster, every port and the temp
dir chosen per node (docs/design/stack.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from cluster import processes
from cluster.credentials import CREDENTIALS_FILE_VARIABLE, without_credential_variables
from cluster.net import LOOPBACK, http_ok, wait_until
from cluster.private_files import private_directory

# `ray start` options that take a port: those of the head only, then those of every node.
HEAD_PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port")
NODE_PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)
PORT_FLAGS = HEAD_PORT_FLAGS + NODE_PORT_FLAGS
# Ports that only environment variables set (Prometheus endpoints of the head's autoscaler and dashboard).
PORT_VARIABLES = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")
PORT_NAMES = PORT_FLAGS + PORT_VARIABLES  # a head's ports
WORKER_NODE_PORT_NAMES = NODE_PORT_FLAGS  # a worker node's ports
NODE_START_ATTEMPTS = 3

SINGLE_MACHINE_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
SINGLE_MACHINE_ENV = {SINGLE_MACHINE_VARIABLE: "0"}
# A caller's settings for some other cluster must not leak into a node.
_CLIENT_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def machine_address() -> str:
    """The address Ray gives a node of a multi-node cluster on this machine (the one other machines
    would reach it at)."""
    from ray._common.network_utils import node_ip_address_from_perspective

    return node_ip_address_from_perspective()


def node_mode_env(host: str) -> dict[str, str]:
    """Ray's single-machine mode for a cluster on loopback, its multi-node mode for any other address."""
    return SINGLE_MACHINE_ENV if host == LOOPBACK else {SINGLE_MACHINE_VARIABLE: "1"}


def gcs_address(ports: Mapping[str, int], host: str = LOOPBACK) -> str:
    """The address for `ray.init(address=...)` and for nodes joining the cluster."""
    return f"{host}:{ports['port']}"


def dashboard_url(ports: Mapping[str, int], host: str = LOOPBACK) -> str:
    """The dashboard and jobs API, for `ray job submit`."""
    return f"http://{host}:{ports['dashboard-port']}"


@dataclass
class RayNode:
    """One `ray start --block` process (a head or a worker node) on `host`; its ports by option name."""

    ports: dict[str, int]
    process: subprocess.Popen
    host: str = LOOPBACK

    def stop(self) -> None:
        """Stop the node: its raylet, its workers and every other process it started. A worker node
        is first drained as if it were preempted (up to 30 s while tasks and actors run on it)."""
        processes.stop_child(self.process)

    def kill(self) -> None:
        """End the node at once, as a machine failure would: no draining, no shutdown."""
        processes.kill_child(self.process)


Node = TypeVar("Node", bound=RayNode)


@dataclass
class RayHead(RayNode):
    """The node that runs the GCS, the dashboard and the jobs API."""

    @property
    def gcs_address(self) -> str:
        return gcs_address(self.ports, self.host)

    @property
    def dashboard_url(self) -> str:
        return dashboard_url(self.ports, self.host)


def ray_auth_env(auth_token: str | None) -> dict[str, str]:
    """Token authentication with `auth_token`, or explicitly none (so no default token enables it)."""
    if auth_token is None:
        return {"RAY_AUTH_MODE": "disabled"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token}


def ray_client_env(ports: Mapping[str, int], auth_token: str | None, host: str = LOOPBACK) -> dict[str, str]:
    """What a client process needs: `ray.init()` and Ray Train/Tune use RAY_ADDRESS (the GCS);
    `ray job submit` and JobSubmissionClient prefer RAY_API_SERVER_ADDRESS (the dashboard)."""
    return {
        "RAY_ADDRESS": gcs_address(ports, host),
        "RAY_API_SERVER_ADDRESS": dashboard_url(ports, host),
        **ray_auth_env(auth_token),
        **node_mode_env(host),
    }


def disconnect_driver() -> None:
    """Disconnect this process's Ray driver, if it has one: a driver left connected would outlive
    its cluster, noisily."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def ray_temp_dir(owner: Path) -> Path:
    """A short per-owner directory for a node's session files (0700 once the node starts).

    Ray puts unix sockets under it, and a socket path must stay under ~107 bytes, which a temp dir
    inside a deep project or pytest directory would exceed.
    """
    digest = hashlib.sha256(str(owner.resolve()).encode()).hexdigest()[:12]
    return Path("/tmp") / f"vitae-ray-{digest}"


def ray_session_root(temp_dir: Path) -> Path:
    """Ray's own `--temp-dir`, inside the node's private `temp_dir`: Ray makes it and every session
    directory 0777 (see `cluster.private_files`)."""
    return temp_dir / "ray"


def ray_session_logs(temp_dir: Path) -> Path:
    """The logs of the node's latest session."""
    return ray_session_root(temp_dir) / "session_latest" / "logs"


def _temp_dir_flag(temp_dir: Path) -> str:
    return f"--temp-dir={ray_session_root(private_directory(temp_dir))}"


def ray_node_healthy(ports: Mapping[str, int], host: str = LOOPBACK) -> bool:
    """The node's agent reports its raylet alive (registered with the GCS), and the GCS on a head."""
    return http_ok(f"http://{host}:{ports['dashboard-agent-listen-port']}/api/healthz")


def ray_head_healthy(ports: Mapping[str, int], host: str = LOOPBACK) -> bool:
    """The dashboard answers and the head's agent reports its raylet and the GCS alive."""
    return http_ok(f"{dashboard_url(ports, host)}/api/gcs_healthz") and ray_node_healthy(ports, host)


def start_ray_head(
    ports: Mapping[str, int],
    num_cpus: int,
    auth_token: str | None,
    temp_dir: Path,
    log_path: Path,
    worker_env: Mapping[str, str] | None = None,
    host: str = LOOPBACK,
    timeout_s: float = 180,
) -> RayHead:
    """Start a Ray head on `host` and wait until it accepts jobs.

    On loopback (the default) the cluster is this one node; on the machine's address
    (`machine_address()`) worker nodes can join it (`start_ray_worker_node`). `num_cpus` may exceed
    the real core count (logical CPUs let multi-worker runs fit on a small machine). `worker_env` is
    added to the environment of every Ray process, drivers and workers included, the way a real
    cluster's nodes are configured with service endpoints and credentials; where it names an S3
    credentials file, the caller's credential variables are left out (`cluster.credentials`). It
    runs in a session of its own (see `processes.launch`) and outlives the caller.
    """
    argv = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        f"--node-ip-address={host}",
        f"--dashboard-host={host}",
        "--include-dashboard=true",
        f"--num-cpus={num_cpus}",
        _temp_dir_flag(temp_dir),
        "--disable-usage-stats",
        "--log-style=record",
        *(f"--{flag}={ports[flag]}" for flag in PORT_FLAGS),
    ]  # fmt: skip
    env = _node_env(auth_token, worker_env, host)
    env.update({name: str(ports[name]) for name in PORT_VARIABLES})
    # Ray's own state-API calls inside actors (e.g. Ray Train's placement-group cleaner) otherwise
    # look the cluster up among every `gcs_server` on the machine and fail when there are several.
    env["RAY_API_SERVER_ADDRESS"] = dashboard_url(ports, host)
    # Stopping the head ends the cluster: no draining first (on SIGTERM `ray start` waits up to 30 s
    # for the node to go idle, which detached actors such as Ray Train's never let it).
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    return _start_node(lambda: RayHead(dict(ports), processes.launch(argv, log_path, env), host),
                       lambda: ray_head_healthy(ports, host), f"Ray head at {dashboard_url(ports, host)}", timeout_s)


def start_ray_worker_node(
    head_address: str,
    ports: Mapping[str, int],
    num_cpus: int,
    resources: Mapping[str, float],
    auth_token: str | None,
    temp_dir: Path,
    log_path: Path,
    worker_env: Mapping[str, str] | None = None,
    timeout_s: float = 180,
) -> RayNode:
    """Start a worker node on this machine that joins the multi-node cluster whose GCS is at
    `head_address` (host:port), with `num_cpus` logical CPUs and custom `resources`; wait until
    its raylet has registered. `ports` are this node's own (`WORKER_NODE_PORT_NAMES`); `auth_token`
    and `worker_env` are as for its head. `stop()` takes the node out of the cluster.
    """
    host = head_address.rsplit(":", 1)[0]
    argv = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
        f"--address={head_address}",
        f"--node-ip-address={host}",
        f"--num-cpus={num_cpus}",
        f"--resources={json.dumps(dict(resources))}",
        _temp_dir_flag(temp_dir),
        "--disable-usage-stats",
        "--log-style=record",
        *(f"--{flag}={ports[flag]}" for flag in NODE_PORT_FLAGS),
    ]  # fmt: skip
    env = _node_env(auth_token, worker_env, host)
    return _start_node(lambda: RayNode(dict(ports), processes.launch(argv, log_path, env), host),
                       lambda: ray_node_healthy(ports, host), f"Ray worker node joining {head_address}", timeout_s)


def _node_env(auth_token: str | None, worker_env: Mapping[str, str] | None, host: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _CLIENT_VARIABLES}
    if CREDENTIALS_FILE_VARIABLE in (worker_env or {}):  # the node's S3 credentials: the file, not the caller's
        env = without_credential_variables(env)
    env.update(worker_env or {})
    env.update(ray_auth_env(auth_token))
    env.update(node_mode_env(host))
    return env


def _start_node(launch: Callable[[], Node], ready: Callable[[], bool], what: str, timeout_s: float) -> Node:
    """Launch a node and wait until it is `ready`; stop it if it is not.

    A raylet gives its dashboard agent a fixed 15 s to start and exits otherwise
    (ray-project/ray#65983), which a loaded machine can exceed: a `ray start` that exits while
    starting is tried again, up to `NODE_START_ATTEMPTS` times.
    """
    attempts_left = NODE_START_ATTEMPTS
    while True:
        attempts_left -= 1
        node = launch()
        try:
            wait_until(ready, what, timeout_s, node.process)
            return node
        except RuntimeError:  # `ray start` exited
            node.stop()
            if not attempts_left:
                raise
        except BaseException:
            node.stop()
            raise
