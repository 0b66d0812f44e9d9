"""Shared, session-scoped real services for the test suite (one of each per session).

They start once, through the same code as `vitae stack up` (cluster/): a moto S3 server, an MLflow
server (sqlite backend, proxied artifacts) and a Ray head (`ray start --head` on loopback, token
authentication, oversubscribed logical CPUs). `s3_endpoint`, `mlflow_server` and `ray_cluster` point
the test process at their service through the standard environment variables and restore them when
the session ends; `s3_service`, `mlflow_service`, `ray_cluster` and `service_homes` give the
processes and their files, for the checks that they listen and store privately.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Iterator, Mapping

import pytest

from cluster.credentials import CREDENTIAL_VARIABLES, credentials_file_env, write_credentials_file
from cluster.mlflow_server import MlflowServer, start_mlflow_server
from cluster.net import free_port, free_ports
from cluster.ray_head import (
    PORT_NAMES,
    SINGLE_MACHINE_ENV,
    disconnect_driver,
    ray_auth_env,
    ray_client_env,
    ray_temp_dir,
    start_ray_head,
)
from cluster.s3_server import S3Server, start_s3_server

# Planted, fake credentials: security tests grep logs and artifacts for these exact values. Drawn at
# import, like the Ray token, so that they exist only at run time: a copy of this file (a job's
# uploaded working directory holds one) cannot pass for a leak.
TEST_ACCESS_KEY = "AKIATEST" + secrets.token_hex(6).upper()
TEST_SECRET_KEY = "planted-secret-" + secrets.token_hex(12)

RAY_NUM_CPUS = 8  # logical CPUs: multi-worker Train runs fit on a 2-core machine

# Ray fixes its authentication mode and single-machine mode when it is first imported, and test
# modules import ray while they are collected, before any fixture runs: set them up front.
RAY_AUTH_TOKEN = secrets.token_hex(32)
os.environ.update(ray_auth_env(RAY_AUTH_TOKEN))
os.environ.update(SINGLE_MACHINE_ENV)


SERVICE_FIXTURES = {"service_homes", "s3_service", "s3_endpoint", "mlflow_service", "mlflow_server", "ray_cluster"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses one of the session's services (directly or through another fixture) is
    marked `services`; modules that start services of their own carry the mark themselves."""
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="module", autouse=True)
def module_leaves_the_process_as_it_found_it() -> Iterator[None]:
    """A module whose tests connect this process to Ray (commands run through `main()`) disconnects
    when it ends, and `builtins.print`, which Ray's progress bars replace, is put back: later modules
    see neither."""
    original_print = builtins.print
    yield
    builtins.print = original_print
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@contextlib.contextmanager
def _environ(values: Mapping[str, str], unset: tuple[str, ...] = ()) -> Iterator[None]:
    """Set `values` and remove `unset` in os.environ; put back what was there before on exit."""
    saved = {key: os.environ.get(key) for key in (*values, *unset)}
    for key in unset:
        os.environ.pop(key, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def service_homes(tmp_path_factory) -> dict[str, Path]:
    """Where each session service keeps its files and logs (S3: its credentials file)."""
    return {name: tmp_path_factory.mktemp(name) for name in ("s3", "mlflow", "ray")}


@pytest.fixture(scope="session")
def s3_service(service_homes) -> Iterator[S3Server]:
    """A real moto S3 server process."""
    server = start_s3_server(log_path=service_homes["s3"] / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_service, service_homes):
    """The S3 server's endpoint; the S3 environment variables point every client at it, with the
    planted credentials in a credentials file, as the embedded stack hands them out."""
    credentials = write_credentials_file(service_homes["s3"] / "aws-credentials", TEST_ACCESS_KEY, TEST_SECRET_KEY)
    with _environ(
        {
            "AWS_ENDPOINT_URL_S3": s3_service.endpoint,
            **credentials_file_env(credentials),
            "AWS_DEFAULT_REGION": "us-east-1",
        },
        unset=CREDENTIAL_VARIABLES,
    ):
        yield s3_service.endpoint


@pytest.fixture(scope="session")
def mlflow_service(service_homes) -> Iterator[MlflowServer]:
    """A real `mlflow server` (sqlite, artifacts served by it)."""
    home = service_homes["mlflow"]
    server = start_mlflow_server(home, free_port(), home / "mlflow.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_service):
    """The MLflow server's URI; MLFLOW_TRACKING_URI points at it."""
    with _environ({"MLFLOW_TRACKING_URI": mlflow_service.uri}):
        yield mlflow_service.uri


@pytest.fixture(scope="session")
def ray_cluster(service_homes, s3_endpoint, mlflow_server):
    """A real Ray head (`ray start --head`, token auth, 8 logical CPUs); yields its `RayHead`.

    RAY_ADDRESS (the GCS, for `ray.init()` and Ray Train/Tune) and RAY_API_SERVER_ADDRESS (for job
    submission) point at it. The head starts from this process's environment, so every Ray process,
    workers included, sees the S3 and MLflow settings of the fixtures above, as the nodes of a
    configured cluster would.
    """
    home = service_homes["ray"]
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
    head = start_ray_head(ports, RAY_NUM_CPUS, RAY_AUTH_TOKEN, ray_temp_dir(home), home / "ray.log")
    try:
        with _environ(ray_client_env(ports, RAY_AUTH_TOKEN)):
            yield head
    finally:
        disconnect_driver()
        head.stop()
        shutil.rmtree(ray_temp_dir(home), ignore_errors=True)
