"""A driver's connection to the Ray cluster, and the checks made against the cluster before a job
uses it.

`connect_to_ray` joins the cluster named by RAY_ADDRESS, or gives up in one line naming the
address, after one attempt of Ray's own (`RAY_gcs_server_port_wait_time_s`: Ray's default is 20
attempts, 826 s on a dead address). An attempt waits 5 s for the gRPC channels to the GCS and its
pubsub and 30 s for the cluster id (Ray's defaults, `RAY_gcs_rpc_server_connect_timeout_s` and
`RAY_py_gcs_connect_timeout_s`, read when `ray` is imported): ~41 s in all. A setting the user
exported wins. Without RAY_ADDRESS, `ray.init()` behaves as Ray's own default (a local instance).

`require_resources` refuses a job whose resources the cluster can never hold, which Ray would
otherwise wait for forever. What the cluster can hold is `cluster_capacity()`: on an autoscaling
cluster the most its autoscaler may launch (Ray Train's own check reads the same), otherwise the
resources of the nodes alive now, so on a cluster whose nodes are added by hand, add them first.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Iterator, Mapping

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
    with _defaults_in_environ(CONNECT_SETTINGS if bounded else {}):
        import ray

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
    import ray
    from ray._private.state import state

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
