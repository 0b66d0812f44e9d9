"""Shared, session-scoped real services for the test suite (one of each per session).

Expensive services start once: a moto S3 server process on loopback here; the MLflow server and
the Ray cluster fixtures live beside it as they are added.
"""

from __future__ import annotations

import os

import pytest

from cluster.s3_server import start_s3_server

# Planted, fake credentials: security tests grep logs and artifacts for these exact values.
TEST_ACCESS_KEY = "AKIATESTPLANTEDKEY01"
TEST_SECRET_KEY = "planted-secret-9f3c2a7e-do-not-log"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real moto S3 server process; the S3 environment variables point every client at it."""
    server = start_s3_server(log_path=tmp_path_factory.mktemp("s3") / "moto.log")
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL_S3=server.endpoint,
        AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=TEST_SECRET_KEY,
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield server.endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_S3_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
