"""The embedded Ray head: `ray start --head --block` on loopback, with token authentication.

Loopback only. On Linux `ray start` replaces a loopback `--node-ip-address` with the machine's
address and then binds its gRPC servers to 0.0.0.0. Ray's single-machine mode
(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the default on macOS) keeps the node address at 127.0.0.1,
and every server binds there. Clients need the same variable, set before `import ray`; otherwise
`ray.init(address="127.0.0.1:PORT")` resolves 127.0.0.1 to the machine's address and cannot connect.

Token authentication. The head runs with `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN` set to a token
generated for it, and every client needs the same two variables (`ray_client_env`). Ray's own
default, `~/.ray/auth_token`, is shared by every cluster of the user, so it is neither read nor written.

Coexistence. Every port is chosen per head, including those with fixed defaults (dashboard 8265,
client server 10001, agent 52365, metrics 44217/44227), and `--temp-dir` keeps the session files
and `ray_current_cluster` apart from other clusters'. `ray stop` stops every Ray process on the
machine, so a head is only ever stopped through its own process family (`processes.stop`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cluster import processes
from cluster.net import LOOPBACK, http_ok, wait_until

# `ray start` options that take a port.
PORT_FLAGS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "node-manager-port",
    "object-manager-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)
# Ports that only environment variables set (Prometheus endpoints of the autoscaler and dashboard).
PORT_VARIABLES = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")
PORT_NAMES = PORT_FLAGS + PORT_VARIABLES

SINGLE_MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# A caller's settings for some other cluster must not leak into the head.
_CLIENT_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def gcs_address(ports: Mapping[str, int]) -> str:
    """The address for `ray.init(address=...)`."""
    return f"{LOOPBACK}:{ports['port']}"


def dashboard_url(ports: Mapping[str, int]) -> str:
    """The dashboard and jobs API, for `ray job submit`."""
    return f"http://{LOOPBACK}:{ports['dashboard-port']}"


@dataclass
class RayHead:
    ports: dict[str, int]
    process: subprocess.Popen

    @property
    def gcs_address(self) -> str:
        return gcs_address(self.ports)

    @property
    def dashboard_url(self) -> str:
        return dashboard_url(self.ports)

    def stop(self) -> None:
        processes.stop_child(self.process)


def ray_auth_env(auth_token: str | None) -> dict[str, str]:
    """Token authentication with `auth_token`, or explicitly none (so no default token enables it)."""
    if auth_token is None:
        return {"RAY_AUTH_MODE": "disabled"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token}


def ray_client_env(ports: Mapping[str, int], auth_token: str | None) -> dict[str, str]:
    """What a client process needs: `ray.init()` and Ray Train/Tune use RAY_ADDRESS (the GCS);
    `ray job submit` and JobSubmissionClient prefer RAY_API_SERVER_ADDRESS (the dashboard)."""
    return {
        "RAY_ADDRESS": gcs_address(ports),
        "RAY_API_SERVER_ADDRESS": dashboard_url(ports),
        **ray_auth_env(auth_token),
        **SINGLE_MACHINE_ENV,
    }


def ray_temp_dir(owner: Path) -> Path:
    """A short per-owner directory for the head's session files.

    Ray puts unix sockets under it, and a socket path must stay under ~107 bytes, which a temp dir
    inside a deep project or pytest directory would exceed.
    """
    digest = hashlib.sha256(str(owner.resolve()).encode()).hexdigest()[:12]
    return Path("/tmp") / f"vitae-ray-{digest}"


def ray_head_healthy(ports: Mapping[str, int]) -> bool:
    """The dashboard answers and the head's agent reports its raylet and the GCS alive."""
    return http_ok(f"{dashboard_url(ports)}/api/gcs_healthz") and http_ok(
        f"http://{LOOPBACK}:{ports['dashboard-agent-listen-port']}/api/healthz"
    )


def start_ray_head(
    ports: Mapping[str, int],
    num_cpus: int,
    auth_token: str | None,
    temp_dir: Path,
    log_path: Path,
    worker_env: Mapping[str, str] | None = None,
    timeout_s: float = 180,
) -> RayHead:
    """Start a Ray head on loopback and wait until it accepts jobs.

    `num_cpus` may exceed the real core count (logical CPUs let multi-worker runs fit on a small
    machine). `worker_env` is added to the environment of every Ray process, drivers and workers
    included, the way a real cluster's nodes are configured with service endpoints and credentials.
    It runs in a session of its own (see `processes.launch`) and outlives the caller.
    """
    argv = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        f"--node-ip-address={LOOPBACK}",
        f"--dashboard-host={LOOPBACK}",
        "--include-dashboard=true",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        "--log-style=record",
        *(f"--{flag}={ports[flag]}" for flag in PORT_FLAGS),
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key not in _CLIENT_VARIABLES}
    env.update(worker_env or {})
    env.update(ray_auth_env(auth_token))
    env.update(SINGLE_MACHINE_ENV)
    env.update({name: str(ports[name]) for name in PORT_VARIABLES})
    head = RayHead(dict(ports), processes.launch(argv, log_path, env))
    try:
        wait_until(lambda: ray_head_healthy(ports), f"Ray head at {head.dashboard_url}", timeout_s, head.process)
    except BaseException:
        head.stop()
        raise
    return head
