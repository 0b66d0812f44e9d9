"""MLflow behind faults, for the tests of what the registry and model commands do when the tracking
server fails: this process's tracking URI switched for a block, to a `FaultProxy` in front of the
session's `mlflow server` or to a closed port (a server that is down)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from cluster.net import free_port
from tests.support.s3_fault_proxy import FaultProxy


@contextlib.contextmanager
def tracking_uri(uri: str) -> Iterator[str]:
    """MLflow calls of this process (and the children it starts) go to `uri` inside the block."""
    import mlflow

    saved_env, saved_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


@contextlib.contextmanager
def mlflow_behind_proxy(upstream: str) -> Iterator[FaultProxy]:
    """A `FaultProxy` in front of the MLflow server `upstream`, this process pointed at it."""
    proxy = FaultProxy(upstream).start()
    try:
        with tracking_uri(proxy.endpoint):
            yield proxy
    finally:
        proxy.stop()


def dead_tracking_uri() -> str:
    """The URI of a port nothing listens on: an MLflow server that is down."""
    return f"http://127.0.0.1:{free_port()}"
