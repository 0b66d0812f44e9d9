"""Faults during a training job on the real stack, one scenario for every assertion.

A 2-worker run of 4 epochs (digits at 16 px) is submitted with `ray job submit` and logs to an MLflow
server of its own (the session's is shared by the whole suite and must stay up). While it runs:

    checkpoint 1 stored -> one Ray Train worker process is killed (SIGKILL): Ray Train restarts
                           the worker group from the checkpoint (`checkpoint.max_failures`)
    checkpoint 2 stored -> the MLflow server is stopped; training goes on, rank 0 holds the
                           metrics of the next epoch it ends back (H: 3, or 4 when epoch 3 ended
                           before the server stopped, checkpoints uploading in the background)
    checkpoint H stored -> the job's driver is killed (SIGKILL), taking the held-back metrics with
                           it; once its workers have ended (their last checkpoint: K >= H), the
                           MLflow server is started again on the same port
    the job is submitted again under the same run name: it resumes after epoch K, sends epochs
    H..K's metrics from the checkpoint, and trains the last epochs.

Meanwhile a `TrainingRun` in this process, attached before the outage, logs an epoch during it and
one after it: the first is held back and sent with the second.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from infra import object_store
from pipelines.tracking.client import TrackingServer, model_files_uri
from pipelines.tracking.runs import MODEL_URI_TAG, RUN_NAME_TAG
from pipelines.tracking.training_run import TrainingRun
from tests.conftest import RAY_AUTH_TOKEN, TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.support.train_helpers import (
    ANSI_COLOUR,
    checkpointed_epoch,
    OwnMlflowServer,
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

RUN_NAME = "digits-faults"
EXPERIMENT = "vitae-faults"
EPOCHS = 5
KILL_WORKER_AFTER, STOP_MLFLOW_AFTER = 1, 2  # checkpointed epochs
HELD_BACK = re.compile(r"the metrics of epoch\(s\) (\d+) are held back; training goes on")
EPOCH_LINE = re.compile(rf"\(RayTrainWorker pid=(\d+)[^)]*\) epoch (\d+)/{EPOCHS}  train_loss")


@dataclass
class Timeline:
    """What happened when, in seconds since the first submission."""

    start: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str]] = field(default_factory=list)

    def mark(self, event: str) -> None:
        elapsed = round(time.monotonic() - self.start, 1)
        self.events.append((elapsed, event))
        print(f"[{elapsed:6.1f} s] {event}", flush=True)

    def at(self, prefix: str) -> float:
        times = [when for when, event in self.events if event.startswith(prefix)]
        assert times, f"no event {prefix!r} in {self.events}"
        return times[0]


@dataclass
class Probe:
    """The test process's own tracker: an epoch logged during the outage and one after it."""

    run_id: str
    during_outage_s: float  # how long log_epoch took while MLflow was down
    held_back_epochs: set[int]  # what it held back then
    logged_at_ms: int  # when it logged the epoch during the outage


@dataclass
class Scenario:
    mlflow_uri: str
    timeline: Timeline
    killed_worker: int
    workers_before: set[int]
    workers_after: set[int]
    first_status: str
    first_logs: str
    second_output: str
    second_returncode: int
    probe: Probe
    submissions: tuple[str, ...]
    mlflow_back_at: float  # time.time() when the MLflow server answered again
    held_back_epoch: int  # the first epoch rank 0 held back (H)
    resumed_after: int  # the killed job's last checkpoint (K)

    @property
    def held_back_epochs(self) -> str:
        return ", ".join(str(epoch) for epoch in range(self.held_back_epoch, self.resumed_after + 1))

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.mlflow_uri)

    @property
    def run(self):
        experiment = self.client.get_experiment_by_name(EXPERIMENT).experiment_id
        runs = self.client.search_runs([experiment], filter_string=f"tags.`{RUN_NAME_TAG}` = '{RUN_NAME}'")
        assert len(runs) == 1, [run.info.run_id for run in runs]
        return runs[0]

    def history(self, key: str, run_id: str | None = None) -> list:
        """The metric's entries, in the order they were logged."""
        return sorted(self.client.get_metric_history(run_id or self.run.info.run_id, key),
                      key=lambda metric: metric.timestamp)


def wait_for(condition, what: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.3)
    return value


def probe_metrics(epoch: int) -> dict[str, float]:
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.5 / epoch, "val_top1": 0.2 * epoch}


@pytest.fixture(scope="module")
def scenario(ray_cluster, tmp_path_factory) -> Scenario:
    object_store._CLIENTS.clear()  # clients of this session's S3 server only
    home = tmp_path_factory.mktemp("faults")
    tracking_server = OwnMlflowServer(home)
    session_uri = mlflow.get_tracking_uri()  # the probe's attach changes it for this process: put back
    try:
        data_bucket, checkpoint_bucket = f"faults-data-{uuid.uuid4().hex[:8]}", f"faults-ckpt-{uuid.uuid4().hex[:8]}"
        for bucket in (data_bucket, checkpoint_bucket):
            object_store.make_client().create_bucket(Bucket=bucket)
        data_url = prepare_dataset("digits", f"s3://{data_bucket}/digits16", shard_max_samples=170, digits_size=16)
        storage_url = f"s3://{checkpoint_bucket}/runs"
        config_path = write_config(home / "digits.yaml", tiny_config(
            RUN_NAME, data_url, storage_url, schedule={"epochs": EPOCHS, "warmup_epochs": 0.5},
            mlflow={"experiment": EXPERIMENT, "tracking_uri": tracking_server.server.uri},
            checkpoint={"max_failures": 1}))
        yield run_scenario(config_path, storage_url, tracking_server)
    finally:
        tracking_server.stop()
        mlflow.set_tracking_uri(session_uri)


def run_scenario(config_path: Path, storage_url: str, tracking_server: OwnMlflowServer) -> Scenario:
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient()
    probe = TrainingRun.attach("probe", EXPERIMENT, tracking_server.server.uri, None, {"probe": 1}, "probe: 1\n")
    timeline = Timeline()
    first = f"faults-{uuid.uuid4().hex[:8]}"
    ray_job("submit", "--no-wait", "--submission-id", first, "--", *train_entrypoint(config_path))
    timeline.mark("submitted")
    job_id = wait_for(lambda: jobs.get_job_info(first).job_id, "the job's Ray job id")

    assert wait_for_checkpoint(storage_url, RUN_NAME, KILL_WORKER_AFTER, 240, first), "no first checkpoint\n" + job_report(first)
    workers_before = train_worker_pids(job_id)
    killed_worker = min(workers_before)
    os.kill(killed_worker, signal.SIGKILL)
    timeline.mark(f"checkpoint {KILL_WORKER_AFTER} stored; worker pid {killed_worker} of {sorted(workers_before)} "
                  "killed")
    workers_after = wait_for(lambda: len(pids := train_worker_pids(job_id) - workers_before) == 2 and pids,
                             "a restarted worker group")
    timeline.mark(f"worker group restarted: pids {sorted(workers_after)}")

    assert wait_for_checkpoint(storage_url, RUN_NAME, STOP_MLFLOW_AFTER, 240, first), (
        "no checkpoint after the restart\n" + job_report(first))
    tracking_server.stop()
    timeline.mark(f"checkpoint {STOP_MLFLOW_AFTER} stored; MLflow server stopped")
    started = time.monotonic()
    probe.log_epoch(1, probe_metrics(1), [probe_metrics(1)], torch.eye(2, dtype=torch.long), ["a", "b"])
    probe_outage = Probe(probe.run_id, time.monotonic() - started, {metric.step for metric in probe.held_back},
                         min((metric.timestamp for metric in probe.held_back), default=0))
    held_back = wait_for(lambda: HELD_BACK.search(jobs.get_job_logs(first)), "rank 0's held-back warning", 150)
    held_back_epoch = int(held_back.group(1))
    timeline.mark(f"epoch {held_back_epoch}'s metrics held back")
    assert held_back_epoch < EPOCHS, "the job ended before its driver could be killed\n" + job_report(first)
    # without the hold-back, rank 0 would retry for minutes and the next checkpoint would wait
    if wait_for_checkpoint(storage_url, RUN_NAME, held_back_epoch, 150, first):
        timeline.mark(f"checkpoint {held_back_epoch} stored while MLflow was down")
    driver_pid = int(jobs.get_job_info(first).driver_info.pid)
    os.kill(driver_pid, signal.SIGKILL)
    timeline.mark(f"driver pid {driver_pid} killed")
    first_status = wait_for(lambda: (status := jobs.get_job_status(first)).is_terminal() and status,
                            "the killed job's end")
    timeline.mark(f"first job {first_status}")
    wait_for(lambda: not train_worker_pids(job_id), "the killed job's workers to end")
    resumed_after = checkpointed_epoch(storage_url, RUN_NAME)
    timeline.mark(f"the killed job's workers ended; its last checkpoint: epoch {resumed_after}")
    tracking_server.start()
    mlflow_back_at = time.time()
    timeline.mark("MLflow server started again on the same port")
    probe.log_epoch(2, probe_metrics(2), [probe_metrics(1), probe_metrics(2)], torch.eye(2, dtype=torch.long),
                    ["a", "b"])
    probe.finish()
    first_logs = ray_job("logs", first).stdout

    second = f"faults-{uuid.uuid4().hex[:8]}"
    timeline.mark("submitted again under the same run name")
    resumed = ray_job("submit", "--submission-id", second, "--", *train_entrypoint(config_path), check=False)
    timeline.mark(f"second job ended (exit {resumed.returncode})")
    return Scenario(tracking_server.server.uri, timeline, killed_worker, workers_before, workers_after, str(first_status),
                    first_logs, resumed.stdout + resumed.stderr, resumed.returncode, probe_outage, (first, second),
                    mlflow_back_at, held_back_epoch, resumed_after)


def completed_epochs(logs: str) -> list[tuple[int, int]]:
    """(worker pid, epoch) of each epoch line rank 0 printed, in order."""
    return [(int(pid), int(epoch)) for pid, epoch in EPOCH_LINE.findall(ANSI_COLOUR.sub("", logs))]


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(scenario):
    assert scenario.killed_worker in scenario.workers_before and len(scenario.workers_before) == 2
    assert scenario.workers_after and not scenario.workers_after & scenario.workers_before
    epochs = completed_epochs(scenario.first_logs)
    # the restarted group goes on from the checkpoint stored before the kill, not from epoch 1: epoch 1's,
    # or epoch 2's when its upload, in the background, ended in between. An epoch rank 0 ended after that
    # checkpoint was trained again.
    restored = int(re.search(rf"restored the checkpoint after epoch (\d+) of {EPOCHS}", scenario.first_logs)[1])
    assert restored >= KILL_WORKER_AFTER
    before = [epoch for pid, epoch in epochs if pid in scenario.workers_before]  # rank 0's process
    after = [epoch for pid, epoch in epochs if pid in scenario.workers_after]
    assert before + after == [epoch for _, epoch in epochs], epochs
    assert before == list(range(1, len(before) + 1)) and len(before) >= restored, (epochs, restored)
    assert after == list(range(restored + 1, restored + 1 + len(after))), (epochs, restored)
    # rank 0 prints an epoch's line before it checkpoints the epoch: the driver's kill may fall in between
    assert after[-1] in (scenario.resumed_after, scenario.resumed_after + 1), (epochs, scenario.resumed_after)


def test_a_killed_driver_resubmitted_under_its_name_resumes(scenario):
    assert "FAILED" in scenario.first_status
    assert scenario.second_returncode == 0, scenario.second_output[-4000:]
    assert f"run {RUN_NAME}: resuming after epoch {scenario.resumed_after} of {EPOCHS}" in scenario.second_output
    epochs = [epoch for _, epoch in completed_epochs(scenario.second_output)]
    assert epochs == list(range(scenario.resumed_after + 1, EPOCHS + 1)), epochs
    assert f"done: epoch {EPOCHS}," in scenario.second_output
    assert scenario.run.info.status == "FINISHED"


def test_training_goes_on_while_mlflow_is_down(scenario):
    timeline = scenario.timeline
    stored = timeline.at(f"checkpoint {scenario.held_back_epoch} stored while MLflow was down")
    assert timeline.at(f"checkpoint {STOP_MLFLOW_AFTER} stored; MLflow server stopped") < stored
    assert stored < timeline.at("MLflow server started again")
    assert scenario.held_back_epoch > STOP_MLFLOW_AFTER
    assert f"the metrics of epoch(s) {scenario.held_back_epoch} are held back; training goes on" in scenario.first_logs
    assert scenario.first_logs.count("restored the checkpoint") == 1  # the outage failed nothing


def test_mlflow_holds_every_epoch_once_including_those_held_back(scenario):
    assert f"lacks epoch(s) {scenario.held_back_epochs}" in scenario.second_output, (  # sent from the checkpoint
        f"{scenario.timeline.events}\n{scenario.second_output[-6000:]}")
    for key in ("epoch", "train_loss", "val_top1", "step"):
        assert [metric.step for metric in scenario.history(key)] == list(range(1, EPOCHS + 1)), key
    logged_at = {metric.step: metric.timestamp / 1000 for metric in scenario.history("epoch")}
    assert logged_at[scenario.held_back_epoch] > scenario.mlflow_back_at  # sent once MLflow was back
    assert all(logged_at[epoch] < logged_at[epoch + 1] for epoch in range(1, EPOCHS))


def test_a_tracker_holds_metrics_back_while_mlflow_is_down_and_sends_them_later(scenario):
    probe = scenario.probe
    assert probe.during_outage_s < 15  # a few quick retries, not MLflow's minutes
    assert probe.held_back_epochs == {1}
    history = scenario.history("val_top1", probe.run_id)
    assert [(metric.step, metric.value) for metric in history] == [(1, 0.2), (2, 0.4)]
    assert history[0].timestamp == probe.logged_at_ms  # when it was measured, not when it was sent
    assert scenario.client.get_run(probe.run_id).info.status == "FINISHED"


def test_no_secret_in_the_jobs_logs_metadata_or_mlflow(scenario, tmp_path):
    from ray.job_submission import JobSubmissionClient

    client, run = scenario.client, scenario.run
    infos = [repr(JobSubmissionClient().get_job_info(submission)) for submission in scenario.submissions]
    texts = [scenario.first_logs, scenario.second_output, *infos, json.dumps(run.data.params),
             json.dumps(run.data.tags)]
    client.download_artifacts(run.info.run_id, "", str(tmp_path / "run"))
    model_files = model_files_uri(run.data.tags[MODEL_URI_TAG], TrackingServer.at(scenario.mlflow_uri))
    mlflow.artifacts.download_artifacts(model_files, dst_path=str(tmp_path / "model"), tracking_uri=scenario.mlflow_uri)
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {"config.yaml", "learning_curves.png", "confusion_matrix.png"} <= {path.name for path in files}
    assert any(path.name == "MLmodel" for path in files)
    for secret in (TEST_ACCESS_KEY, TEST_SECRET_KEY, RAY_AUTH_TOKEN):
        assert not any(secret in text for text in texts)
        assert not [path for path in files if secret.encode() in path.read_bytes()]
