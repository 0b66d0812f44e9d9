"""The training job on the real stack (moto S3 server, `mlflow server`, the session's Ray head).

One scenario serves every assertion, because a Ray Train run costs ~20 s of start-up here: the
job is submitted with `ray job submit`, stopped once its first checkpoint is stored, and submitted
again under the same name, which resumes it to the end. The dataset (digits at 16 px) has uneven
shards, so the run also shows that every rank runs the same number of steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME  # written once a checkpoint is registered

from infra import object_store
from data_prep.dataset import PreparedDataset
from pipelines.training.train_state import STATE_NAME
from pipelines.training.validation import evaluate
from pipelines.training.input_pipeline import ReaderLayout, eval_loader
from pipelines.training.optim import build_ema, copy_buffers
from pipelines.training.run_storage import RunStorage
from pipelines.training.sharding import steps_per_epoch
from pipelines.tracking.runs import RUN_NAME_TAG
from pipelines.training.config import TrainConfig
from pipelines.training.worker import WorkerEnv, build_data, build_model
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.support.train_helpers import prepare_dataset, ray_job, tiny_config, train_entrypoint, write_config

pytestmark = pytest.mark.timeout(600)

RUN_NAME = "digits-resume"
EPOCHS = 4
BATCH_SIZE = 32
WORKERS = 2
TRAIN_SAMPLES = 1437  # digits: 80% of 1797


@dataclass
class Scenario:
    config: TrainConfig
    config_path: Path
    storage_url: str
    first_status: str
    first_logs: str
    second: subprocess.CompletedProcess

    @property
    def run(self):
        runs = MlflowClient().search_runs(
            [MlflowClient().get_experiment_by_name(self.config.mlflow.experiment).experiment_id],
            filter_string=f"tags.`{RUN_NAME_TAG}` = '{RUN_NAME}'")
        assert len(runs) == 1, [run.info.run_id for run in runs]
        return runs[0]

    def history(self, key: str) -> dict[int, float]:
        """Epoch -> the last value logged for it."""
        return {m.step: m.value for m in sorted(MlflowClient().get_metric_history(self.run.info.run_id, key),
                                                key=lambda m: m.timestamp)}


def stop_after_first_checkpoint(submission_id: str, storage_url: str, timeout_s: float = 240) -> str:
    """Stop the job as soon as Ray Train has registered a checkpoint; return the job's final status."""
    from ray.job_submission import JobSubmissionClient  # the jobs API at RAY_API_SERVER_ADDRESS

    location = object_store.parse_s3_url(storage_url)
    snapshot = f"{location.key}/{RUN_NAME}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}"
    deadline = time.monotonic() + timeout_s
    while object_store.shared_store(location.bucket).head(snapshot) is None:
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.2)
    client = JobSubmissionClient()
    client.stop_job(submission_id)
    while not (status := client.get_job_status(submission_id)).is_terminal():
        time.sleep(0.2)
    return str(status)


@pytest.fixture(scope="module")
def scenario(ray_cluster, tmp_path_factory) -> Scenario:
    object_store._CLIENTS.clear()  # clients of this session's S3 server only
    data_bucket, checkpoint_bucket = f"train-data-{uuid.uuid4().hex[:8]}", f"train-ckpt-{uuid.uuid4().hex[:8]}"
    for bucket in (data_bucket, checkpoint_bucket):
        object_store.make_client().create_bucket(Bucket=bucket)
    data_url = prepare_dataset("digits", f"s3://{data_bucket}/digits16", shard_max_samples=170, digits_size=16)
    storage_url = f"s3://{checkpoint_bucket}/runs"
    raw = tiny_config(RUN_NAME, data_url, storage_url, schedule={"epochs": EPOCHS, "warmup_epochs": 0.5})
    config_path = write_config(tmp_path_factory.mktemp("train") / "digits.yaml", raw)

    submission_id = f"train-{uuid.uuid4().hex[:8]}"
    ray_job("submit", "--no-wait", "--submission-id", submission_id, "--", *train_entrypoint(config_path))
    first_status = stop_after_first_checkpoint(submission_id, storage_url)
    first_logs = ray_job("logs", submission_id).stdout

    second = ray_job("submit", "--", *train_entrypoint(config_path), check=False)
    return Scenario(TrainConfig.model_validate(raw), config_path, storage_url, first_status, first_logs, second)


def test_a_stopped_job_resubmitted_under_its_name_resumes(scenario):
    assert "STOPPED" in scenario.first_status, scenario.first_status
    output = scenario.second.stdout + scenario.second.stderr
    assert scenario.second.returncode == 0, output[-4000:]
    resumed_after = int(output.split(f"run {RUN_NAME}: resuming after epoch ")[1].split()[0])
    assert 1 <= resumed_after < EPOCHS
    assert f"epoch {resumed_after + 1}/{EPOCHS}" in output and f"epoch {EPOCHS}/{EPOCHS}" in output
    assert f"epoch {resumed_after}/{EPOCHS}" not in output  # not trained again
    assert "img/s" in output and "data wait" in output


def test_the_mlflow_run_continues_without_a_duplicate(scenario):
    run = scenario.run  # exactly one run carries the training run's name
    assert run.info.status == "FINISHED"
    assert sorted(scenario.history("epoch")) == list(range(1, EPOCHS + 1))
    steps = scenario.history("step")
    assert all(steps[epoch] > steps[epoch - 1] for epoch in range(2, EPOCHS + 1))
    assert run.info.run_id in scenario.second.stdout  # the driver prints the run it continued


def test_the_run_learns(scenario):
    train_loss, val_top1 = scenario.history("train_loss"), scenario.history("val_top1")
    assert train_loss[EPOCHS] < train_loss[1]
    assert val_top1[EPOCHS] > 0.5  # ten classes: chance is 0.1


def test_every_rank_runs_the_same_number_of_steps_on_uneven_shards(scenario):
    shards = PreparedDataset.open(scenario.config.data.url).shard_samples("train")
    assert len(set(shards)) > 1 and sum(shards) == TRAIN_SAMPLES
    expected = steps_per_epoch(TRAIN_SAMPLES, WORKERS, BATCH_SIZE)
    # each rank checks its own count against the plan; this is the most any rank ran
    assert set(scenario.history("train_steps").values()) == {expected}


def test_validation_equals_a_single_process_evaluation_of_the_checkpoint(scenario):
    result = RunStorage.open(scenario.storage_url).previous_result(RUN_NAME)
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_NAME, map_location="cpu", weights_only=False)
        config = TrainConfig.model_validate(json.loads((Path(directory) / "config.json").read_text()))
    dataset = PreparedDataset.open(config.data.url)
    model = build_model(config, len(dataset.class_names))
    model.load_state_dict(state["model"])
    ema = build_ema(model, config.optim.ema_decay)
    ema.load_state_dict(state["ema"])
    copy_buffers(model, ema.module)
    cpu = torch.device("cpu")
    data = build_data(config, WorkerEnv(0, 1, cpu), dataset, model.pretrained_cfg)
    loader = eval_loader(data.val, ReaderLayout(0, 1, loader_workers=0), data.eval_transform, batch_size=7)
    totals = evaluate({"val": model, "val_ema": ema.module}, loader, data.to_model_input, 10, cpu)
    assert totals["val"].count == dataset.num_samples("val")
    for name, total in totals.items():
        for key, value in total.metrics(name).items():
            assert value == pytest.approx(result.metrics[key], rel=1e-6, abs=1e-9), key


def test_mlflow_holds_config_curves_confusion_matrix_and_the_packaged_model(scenario):
    client, run = MlflowClient(), scenario.run
    params = run.data.params
    assert params["data.url"] == scenario.config.data.url and params["model.depth"] == "1"
    assert float(params["derived.peak_lr"]) == pytest.approx(scenario.config.peak_lr)
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "learning_curves.png", "confusion_matrix.png"} <= artifacts
    info = mlflow.models.get_model_info(run.data.tags["vitae.model_uri"])
    assert info.metadata["class_names"] == [str(d) for d in range(10)]
    assert (info.metadata["img_size"], len(info.metadata["mean"]), len(info.metadata["std"])) == (16, 3, 3)
    model = mlflow.pytorch.load_model(run.data.tags["vitae.model_uri"])
    assert model(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)).shape == (3, 10)


def test_no_secret_reaches_mlflow_or_the_logs(scenario, tmp_path):
    client, run = MlflowClient(), scenario.run
    config_text = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    texts = [config_text, json.dumps(run.data.params), json.dumps(run.data.tags), scenario.first_logs,
             scenario.second.stdout, scenario.second.stderr]
    for secret in (TEST_ACCESS_KEY, TEST_SECRET_KEY, os.environ["RAY_AUTH_TOKEN"]):
        assert not any(secret in text for text in texts)


@pytest.mark.parametrize("override, message", [
    ("schedule.epochs=6", f"run {RUN_NAME} exists in s3://"),
    ("checkpoint.storage_path=s3://no-such-bucket-vitae/runs", "bucket does not exist: s3://no-such-bucket-vitae"),
])
def test_the_driver_refuses_before_using_the_cluster(scenario, override, message):
    done = subprocess.run(train_entrypoint(scenario.config_path, override), capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitae: error: ") and message in lines[0], lines
    if override.startswith("schedule"):
        assert "another config (schedule.epochs: 4 -> 6)" in lines[0]


def test_the_console_holds_our_epoch_lines_and_not_rays_per_rank_chatter(scenario):
    output = scenario.second.stdout + scenario.second.stderr
    assert f"epoch {EPOCHS}/{EPOCHS}  train_loss" in output
    chatter = [line for line in output.splitlines() if "Reporting training result" in line or "PreemptionWatcher" in line]
    assert not chatter, "\n".join(line[:300] for line in chatter)
