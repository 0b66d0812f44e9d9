"""The session's services keep secrets and listen privately: the planted S3 credentials and the Ray
token never reach a log (the Ray head's session logs, the fixtures' service logs) or a job's
metadata; every process of the S3, MLflow and Ray fixtures and every other process the test session
started, Ray's workers and job drivers included, listens on loopback only; and the fixtures' files
(logs, credentials, MLflow's database and artifacts, Ray's session files) are private to the user.
A job that hands the secrets to a Ray task runs first, so that there is
something to leak. In the whole suite the sweeps of test_cluster_jobs and test_tune run before this:
Ray Tune copies credential variables into its trials' runtime envs, which Ray's runtime env agent
logs, so this is also the check that S3 credentials reach Ray processes only as a file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid

import pytest

from cluster.ray_head import ray_session_logs, ray_temp_dir
from tests.conftest import RAY_AUTH_TOKEN, TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.support.listening import listeners, not_on_loopback
from tests.support.private_paths import shared_paths
from tests.support.train_helpers import ray_job

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


@pytest.mark.parametrize("name", sorted(SECRETS))
def test_no_secret_in_the_session_logs(job, service_homes, tmp_path_factory, name):
    logs = ray_session_logs(ray_temp_dir(service_homes["ray"]))
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


class Worker:
    """As an actor: a Ray worker process that is busy while the listening sockets are read."""

    def pid(self) -> int:
        return os.getpid()


def test_every_fixture_process_listens_on_loopback_only(job, ray_cluster, s3_service, mlflow_service):
    """Every process of the S3, MLflow and Ray fixtures (Ray: GCS, raylet, dashboard and its agent,
    runtime env agent, client server, monitor, log monitor, workers), and every other process of
    the session, job drivers and this test's own Ray driver included, listens on loopback only."""
    import ray

    ray.init()
    try:
        worker = ray.remote(Worker).remote()
        worker_pid = ray.get(worker.pid.remote())
        trees = {"S3": s3_service.pid, "MLflow": mlflow_service.process.pid, "Ray": ray_cluster.process.pid}
        found = {name: listeners([pid]) for name, pid in trees.items()}
        in_fixtures = {listener.pid for group in found.values() for listener in group}
        others = listeners([os.getpid()])
        found["the test session"] = [listener for listener in others if listener.pid not in in_fixtures]
    finally:
        ray.shutdown()
    assert {s3_service.endpoint, mlflow_service.uri} == {
        f"http://127.0.0.1:{listener.port}" for name in ("S3", "MLflow") for listener in found[name]}
    ray_ports = {listener.port for listener in found["Ray"]}
    assert set(ray_cluster.ports.values()) <= ray_ports, f"Ray ports not found: {found['Ray']}"
    assert worker_pid in {listener.pid for listener in found["Ray"]}, f"no worker among {found['Ray']}"
    exposed = [f"{name}: {listener}" for name, group in found.items() for listener in not_on_loopback(group)]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(exposed)


def test_fixture_files_are_private_to_the_user(ray_cluster, s3_endpoint, mlflow_server, service_homes):
    """The fixtures keep their files as the stack does: logs, credentials, MLflow's database and
    artifacts, Ray's session files; no other user of the machine can read them."""
    assert {"moto.log", "aws-credentials", "mlflow.db", "ray.log"} <= {
        path.name for home in service_homes.values() for path in home.iterdir()}
    ray_files = ray_temp_dir(service_homes["ray"])
    assert list(ray_session_logs(ray_files).glob("*.log"))
    shared = [path for home in service_homes.values() for path in shared_paths(home)]
    shared += shared_paths(ray_files, within_private_directories=False)
    assert not shared, "readable by other users:\n" + "\n".join(shared)
