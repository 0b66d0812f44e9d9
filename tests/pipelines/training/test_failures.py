"""A training job whose S3 server dies mid-run, on the real stack: one line, no restarts.

The job reads its shards from, and checkpoints to, an S3 server of the test's own (a real moto
server process; the session's serves the whole suite and must stay up). Once Ray Train has
registered the first checkpoint the server is stopped. The job must then end within a bounded
time, its driver's last line a `vitae: error:` naming the endpoint, with no traceback of its own
and no worker-group restart (the run allows two: `checkpoint.max_failures: 2`).

Ray Train's controller writes to the checkpoint storage too; its pyarrow error, which names no
endpoint, must read as one line naming it (a real pyarrow S3 filesystem against a closed port).
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from cluster.net import free_port
from cluster.s3_server import start_s3_server
from infra import object_store
from infra.errors import UserError
from infra.s3 import S3Config, s3_filesystem
from pipelines.training.failures import user_error
from tests.support.train_helpers import (
    driver_lines,
    job_report,
    prepare_dataset,
    ray_job,
    tiny_config,
    train_entrypoint,
    train_worker_pids,
    wait_for_checkpoint,
    write_config,
)

pytestmark = pytest.mark.timeout(600)

RUN_NAME = "b2-s3-down"
FAILS_WITHIN_S = 240  # S3 retries (about 15 s per request) and Ray Train's shutdown, on a busy 2-core machine


@pytest.fixture
def own_s3(tmp_path, monkeypatch):
    """A moto server of the test's own; this process's S3 clients point at it."""
    server = start_s3_server(log_path=tmp_path / "moto.log")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", server.endpoint)
    try:
        yield server
    finally:
        server.stop()
        object_store._CLIENTS.clear()  # clients of the stopped server


def wait_for_end(submission_id: str, timeout_s: float) -> str:
    from ray.job_submission import JobSubmissionClient

    jobs, deadline = JobSubmissionClient(), time.monotonic() + timeout_s
    while not (status := jobs.get_job_status(submission_id)).is_terminal():
        assert time.monotonic() < deadline, f"still running {timeout_s:.0f} s after S3 stopped\n" + job_report(
            submission_id)
        time.sleep(1)
    return str(status)


def test_an_s3_server_killed_mid_training_ends_the_job_in_one_line_naming_the_endpoint(ray_cluster, own_s3,
                                                                                      tmp_path):
    from ray.job_submission import JobSubmissionClient

    client = object_store.make_client()
    for bucket in ("b2-data", "b2-ckpt"):
        client.create_bucket(Bucket=bucket)
    data_url = prepare_dataset("digits", "s3://b2-data/digits16", shard_max_samples=170, digits_size=16)
    storage_url = "s3://b2-ckpt/runs"
    config_path = write_config(tmp_path / "run.yaml", tiny_config(
        RUN_NAME, data_url, storage_url, schedule={"epochs": 4, "warmup_epochs": 0.5},
        checkpoint={"max_failures": 2}))
    submission_id = f"b2-s3-{uuid.uuid4().hex[:8]}"
    ray_job("submit", "--no-wait", "--submission-id", submission_id,
            "--runtime-env-json", json.dumps({"env_vars": {"AWS_ENDPOINT_URL_S3": own_s3.endpoint}}),
            "--", *train_entrypoint(config_path))
    assert wait_for_checkpoint(storage_url, RUN_NAME, 1, 300, submission_id), "no checkpoint\n" + job_report(
        submission_id)
    own_s3.stop()
    stopped = time.monotonic()
    status = wait_for_end(submission_id, FAILS_WITHIN_S)
    print(f"the job ended {time.monotonic() - stopped:.0f} s after the S3 server stopped")

    logs = ray_job("logs", submission_id).stdout
    driver = driver_lines(logs)
    assert "FAILED" in status, job_report(submission_id)
    assert driver[-1].startswith("vitae: error: ") and own_s3.endpoint in driver[-1], "\n".join(driver[-30:])
    assert not [line for line in driver if line.startswith("Traceback")], "\n".join(driver[-60:])
    job_id = JobSubmissionClient().get_job_info(submission_id).job_id
    assert len(train_worker_pids(job_id, alive_only=False)) == 2, "the worker group was restarted\n" + logs[-6000:]


def test_a_checkpoint_storage_error_of_ray_trains_controller_reads_as_one_line_naming_the_endpoint(s3_endpoint,
                                                                                                   monkeypatch):
    from ray.train import ControllerError

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(OSError) as failure:  # what the controller meets writing its checkpoint snapshot
        s3_filesystem(S3Config.from_env()).get_file_info(f"b2-ckpt/runs/{RUN_NAME}/snapshot.json")

    error = user_error(ControllerError(failure.value))
    assert isinstance(error, UserError), failure.value
    assert endpoint in str(error) and len(str(error).splitlines()) == 1, str(error)
