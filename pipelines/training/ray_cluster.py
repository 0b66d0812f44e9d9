"""A driver's connection to the Ray cluster (`connect_to_ray`: bounded in time on a dead address)
and the checks made against the cluster before a job uses it (`cluster_capacity`,
`require_resources`); why and how long: docs/design/training.md.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Iterator, Mapping

import ray
from ray._private.state import state

from infra.errors import UserError

CONNECT_SETTINGS = {"RAY_gcs_server_port_wait_time_s": "1"}  # attempts to reach the GCS


@contextlib.contextmanager
def _defaults_in_environ(defaults: Mapping[str, str]) -> Iterator[None]:
    """Set those of `defaults` that os.environ lacks; remove them again on exit."""
    added = [name for name in defaults if name not in os.environ]
    os.environ.update({name: defaults[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def connect_to_ray() -> None:
    """`ray.init()` unless connected; when RAY_ADDRESS names a cluster, a `UserError` if it does not
    answer in time."""
    address = os.environ.get("RAY_ADDRESS", "")
    bounded = address not in ("", "local")
    started = time.monotonic()
    with _defaults_in_environ(CONNECT_SETTINGS if bounded else {}):  # read by `ray.init`
        if ray.is_initialized():
            return
        try:
            ray.init()
        except ConnectionError:
            if not bounded:
                raise
            raise UserError(f"no Ray cluster answered at {address} (RAY_ADDRESS) within "
                            f"{time.monotonic() - started:.0f}s: start it, or point RAY_ADDRESS at its "
                            "head (host:port of the GCS)") from None


@dataclass(frozen=True)
class ClusterCapacity:
    resources: Mapping[str, float]
    source: str  # how the cluster was measured, for messages: "has", "can grow to"


def cluster_capacity() -> ClusterCapacity:
    """What the connected cluster can hold: its autoscaler's maximum, or else what it has now."""
    maximum = state.get_max_resources_from_cluster_config()
    if maximum:
        return ClusterCapacity(maximum, "can grow to")
    return ClusterCapacity(ray.cluster_resources(), "has")


def require_resources(needed: Mapping[str, float], capacity: ClusterCapacity, what: str, remedy: str) -> None:
    """A `UserError` naming `what` needs and what the cluster has, unless every resource fits."""
    needed = {name: amount for name, amount in needed.items() if amount > 0}
    available = {name: capacity.resources.get(name, 0.0) for name in needed}
    if any(amount > available[name] + 1e-9 for name, amount in needed.items()):
        raise UserError(f"{what} needs {describe_resources(needed)} but the cluster {capacity.source} "
                        f"{describe_resources(available)}: {remedy}")


def describe_resources(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {amount:g}" for name, amount in sorted(resources.items())) or "nothing"
