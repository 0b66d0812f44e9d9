"""The session's services keep secrets and listen privately: the planted S3 credentials and the Ray
token never reach a log (the Ray head's session logs, the fixtures' service logs) or a job's
metadata, and every process the test session started, Ray's workers and job drivers included,
listens on loopback only. A job that hands the secrets to a Ray task runs first, so that there is
something to leak. In the whole suite the sweeps of test_cluster_jobs and test_tune run before this:
Ray Tune copies credential variables into its trials' runtime envs, which Ray's runtime env agent
logs, so this is also the check that S3 credentials reach Ray processes only as a file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import RAY_AUTH_TOKEN, TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.listening import descendants, is_loopback, listening_addresses
from tests.train_helpers import ray_job

pytestmark = pytest.mark.timeout(300)

SECRETS = {"AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
           "RAY_AUTH_TOKEN": RAY_AUTH_TOKEN}
# The job's task prints what it can use without printing it: the digests of the S3 key pair botocore
# resolves (from the credentials file the head hands out) and of the Ray token in its environment.
TASK = """
import hashlib, os, boto3, ray
def seen():
    credentials = boto3.Session().get_credentials()
    secrets = {"AWS_ACCESS_KEY_ID": credentials.access_key, "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
               "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN", "")}
    return sorted(name + "=" + hashlib.sha256(value.encode()).hexdigest() for name, value in secrets.items())
ray.init()
print("SEEN", *ray.get(ray.remote(seen).remote()))
"""


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@pytest.fixture(scope="module")
def job(ray_cluster) -> str:
    """A job whose task resolves the secrets the head gave it."""
    submission = f"secrets-{uuid.uuid4().hex[:8]}"
    done = ray_job("submit", "--submission-id", submission, "--", sys.executable, "-c", TASK)
    expected = " ".join(f"{name}={digest(secret)}" for name, secret in sorted(SECRETS.items()))
    assert "SEEN " + expected in done.stdout, done.stdout[-2000:]
    return submission


def ray_session_logs(ray_cluster) -> Path:
    temp_dir = next(arg.split("=", 1)[1] for arg in ray_cluster.process.args if arg.startswith("--temp-dir="))
    return Path(temp_dir) / "session_latest" / "logs"


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_no_secret_in_the_session_logs(job, ray_cluster, tmp_path_factory, name):
    logs = ray_session_logs(ray_cluster)
    assert len(list(logs.rglob("*"))) > 20  # the head's, its workers' and the job's logs
    service_logs = list(tmp_path_factory.getbasetemp().rglob("*.log"))  # moto, mlflow, `ray start`
    assert {"moto.log", "mlflow.log", "ray.log"} <= {path.name for path in service_logs}
    found = subprocess.run(["grep", "-rlF", SECRETS[name], str(logs), *map(str, service_logs)],
                           capture_output=True, text=True)
    assert found.returncode == 1 and found.stdout == "", f"{name} appears in {found.stdout}"


def test_no_secret_in_job_metadata(job):
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient().list_jobs()
    assert job in {info.submission_id for info in jobs}
    for info in jobs:  # entrypoint, runtime_env, metadata of every job of the session
        assert not [name for name, secret in SECRETS.items() if secret in repr(info)], info.submission_id


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc")
def test_every_process_of_the_session_listens_on_loopback_only(job, ray_cluster, mlflow_server, s3_endpoint):
    listening = listening_addresses(descendants(os.getpid()) | {os.getpid()})
    ports = {port for _, port in listening}
    services = {int(url.rsplit(":", 1)[1]) for url in (mlflow_server, s3_endpoint, ray_cluster.dashboard_url)}
    assert services | {ray_cluster.ports["port"]} <= ports  # S3, MLflow, Ray's GCS and dashboard
    assert len(listening) >= 10  # and Ray's many other servers
    assert [str(address) for address, _ in listening if not is_loopback(address)] == []
