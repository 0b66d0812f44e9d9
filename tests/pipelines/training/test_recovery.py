"""Step-level recovery on the real stack: a run whose worker is SIGKILLed within an epoch goes on
from its latest mid-epoch checkpoint and ends with the weights of an uninterrupted run; a run stopped
within an epoch and resumed on fewer workers reads the rest of that epoch once.

Two runs of the same config under different names are submitted as Ray jobs side by side; once the
second has registered a checkpoint within its first epoch, one of its Ray Train workers is killed.
Before them, a third run on 2 workers is stopped at its first checkpoint within its only epoch and
submitted again with `scaling.num_workers=1`.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import torch
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

from data_prep.dataset import PreparedDataset
from infra import object_store
from pipelines.training.run_storage import RunStorage
from pipelines.training.train_state import STATE_NAME, WITHIN_EPOCH_SCORE
from pipelines.tuning.driver import is_epoch_result
from tests.support.train_helpers import (job_report, prepare_dataset, ray_job, tiny_config, train_entrypoint,
                                         train_worker_pids, write_config)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(600)

EVERY_STEPS = 10
EPOCHS = 2
SHRUNK_BATCH = 8


def latest_checkpoint_metrics(storage_url: str, run_name: str) -> dict | None:
    """The metrics of the run's latest checkpoint registered by Ray Train (None before the first)."""
    location = object_store.parse_s3_url(storage_url)
    store = object_store.shared_store(location.bucket)
    key = f"{location.key}/{run_name}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}"
    if store.head(key) is None:
        return None
    try:
        latest = json.loads(store.get_bytes(key))["latest_checkpoint_result"]
    except json.JSONDecodeError:  # a read racing Ray's rewrite (moto, under load): ask again
        return None
    return latest["metrics"] if latest else None


def final_state(storage_url: str, run_name: str) -> tuple[dict, list]:
    """The train state of the run's latest checkpoint, and the metrics of the checkpoints it kept."""
    result = RunStorage.open(storage_url).previous_result(run_name)
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_NAME, map_location="cpu", weights_only=False)
    return state, [metrics for _, metrics in result.best_checkpoints]


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory) -> dict:
    object_store._CLIENTS.clear()  # clients of this session's S3 server only
    bucket = f"recovery-{uuid.uuid4().hex[:8]}"
    object_store.make_client().create_bucket(Bucket=bucket)
    data_url = prepare_dataset("digits", f"s3://{bucket}/digits16", shard_max_samples=170, digits_size=16)
    storage_url = f"s3://{bucket}/runs"
    home = tmp_path_factory.mktemp("recovery")
    shrunk = shrink_a_run_within_its_epoch(data_url, storage_url, home)
    jobs = {"shrunk": shrunk["resubmitted"]}
    for run_name in ("steady", "killed"):
        config = tiny_config(run_name, data_url, storage_url, schedule={"epochs": EPOCHS, "warmup_epochs": 0.5},
                             data={"batch_size": 8, "loader_workers": 2},
                             model={"name": "vitae_t", "img_size": 16, "depth": 1, "drop_path_rate": 0.1},
                             checkpoint={"every_steps": EVERY_STEPS, "num_to_keep": 2, "max_failures": 1})
        config_path = write_config(home / f"{run_name}.yaml", config)
        jobs[run_name] = f"recovery-{run_name}-{uuid.uuid4().hex[:6]}"
        ray_job("submit", "--no-wait", "--submission-id", jobs[run_name], "--", *train_entrypoint(config_path))

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient()
    killed = jobs["killed"]
    within_first_epoch = wait_for(
        lambda: (metrics := latest_checkpoint_metrics(storage_url, "killed")) and "within_epoch" in metrics and metrics,
        240, "a checkpoint within the first epoch", lambda: job_report(killed))
    job_id = client.get_job_info(killed).job_id
    workers = train_worker_pids(job_id)
    os.kill(min(workers), signal.SIGKILL)
    for submission_id in jobs.values():
        wait_for(lambda: client.get_job_status(submission_id).is_terminal(), 480, f"job {submission_id} to end",
                 lambda: job_report(submission_id))
        assert str(client.get_job_status(submission_id)) == "SUCCEEDED", job_report(submission_id)
    shrunk["logs"] = ray_job("logs", shrunk["resubmitted"]).stdout
    shrunk["train_samples"] = PreparedDataset.open(data_url).num_samples("train")
    return {"storage_url": storage_url, "checkpoint_at_kill": within_first_epoch, "shrunk_run": shrunk,
            **{name: final_state(storage_url, name) for name in jobs}}


def shrink_a_run_within_its_epoch(data_url: str, storage_url: str, home: Path) -> dict:
    """Run `shrunk` (one epoch) on 2 workers, stop its job at its first checkpoint within the epoch,
    submit it again on 1 worker (without waiting); what the test needs to know of it."""
    from ray.job_submission import JobSubmissionClient

    config = tiny_config("shrunk", data_url, storage_url, schedule={"epochs": 1, "warmup_epochs": 0.5},
                         data={"batch_size": SHRUNK_BATCH, "loader_workers": 2},
                         model={"name": "vitae_t", "img_size": 16, "depth": 1}, checkpoint={"every_steps": 5})
    config_path = write_config(home / "shrunk.yaml", config)
    first = f"recovery-shrunk-{uuid.uuid4().hex[:6]}"
    ray_job("submit", "--no-wait", "--submission-id", first, "--", *train_entrypoint(config_path))
    wait_for(lambda: "within_epoch" in (latest_checkpoint_metrics(storage_url, "shrunk") or {}), 240,
             "a checkpoint within the epoch", lambda: job_report(first))
    client = JobSubmissionClient()
    client.stop_job(first)
    wait_for(lambda: client.get_job_status(first).is_terminal(), 120, f"job {first} to stop", lambda: job_report(first))
    stopped_at = wait_for(lambda: latest_checkpoint_metrics(storage_url, "shrunk"), 30, "the latest checkpoint")
    resubmitted = f"recovery-shrunk-again-{uuid.uuid4().hex[:6]}"
    ray_job("submit", "--no-wait", "--submission-id", resubmitted, "--",
            *train_entrypoint(config_path, "scaling.num_workers=1"))
    return {"stopped_status": str(client.get_job_status(first)), "stopped_at": stopped_at, "resubmitted": resubmitted}


def test_a_run_killed_within_an_epoch_ends_with_the_weights_of_an_uninterrupted_one(runs):
    (steady, _), (killed, _) = runs["steady"], runs["killed"]
    for part in ("model", "ema"):
        differences = [(key, (value - killed[part][key]).abs().max().item())
                       for key, value in steady[part].items() if value.is_floating_point()]
        worst = max(differences, key=lambda item: item[1])
        assert worst[1] <= 1e-5, (part, worst)
    assert steady["progress"]["resumes"] == [] and steady["progress"]["step"] == killed["progress"]["step"]


def test_it_went_on_from_a_checkpoint_within_the_epoch_and_redid_fewer_than_every_steps(runs):
    (killed, _), at_kill = runs["killed"], runs["checkpoint_at_kill"]
    [resume] = killed["progress"]["resumes"]
    assert resume["epoch"] == 0 and resume["batch"] > 0  # within the first epoch, not at its start
    assert resume["step"] % EVERY_STEPS == 0 and resume["step"] >= at_kill["step"]


def test_checkpoints_within_epochs_take_no_place_among_the_kept_epoch_checkpoints(runs):
    _, kept = runs["killed"]
    assert sorted(metrics["epoch"] for metrics in kept) == [1, 2]


def test_a_checkpoint_within_an_epoch_is_no_epoch_result_for_asha():
    within = {"val_top1": WITHIN_EPOCH_SCORE, "step": 3, "epoch_batches": 3, "within_epoch": 1}
    assert not is_epoch_result(within, epochs=3)
    assert is_epoch_result({"epoch": 2, "val_top1": 0.5}, epochs=3)
    assert not is_epoch_result({"epoch": 3, "val_top1": 0.5}, epochs=3)  # the last: reported once fit returns


def test_a_run_resumed_within_an_epoch_on_fewer_workers_reads_the_rest_of_the_epoch_once(runs):
    shrunk = runs["shrunk_run"]
    stopped = shrunk["stopped_at"]  # what the run on 1 worker restored
    assert "STOPPED" in shrunk["stopped_status"], shrunk["stopped_status"]
    assert stopped.get("within_epoch") == 1, stopped  # stopped within the epoch, not after it
    blocks = shrunk["train_samples"] // SHRUNK_BATCH  # batch-sized blocks of the epoch
    read_by_two = 2 * stopped["epoch_batches"]
    assert "resuming within epoch 1 of 1" in shrunk["logs"], shrunk["logs"][-3000:]
    assert (f"epoch 1 goes on with 1 workers instead of 2: its {blocks - read_by_two} blocks left of {blocks} "
            "planned afresh") in shrunk["logs"], shrunk["logs"][-3000:]
    state, _ = runs["shrunk"]
    [epoch] = state["progress"]["history"]
    # every block once: the 2 workers' batches before the stop (their statistics restored) and the rest
    assert epoch["train_samples"] == blocks * SHRUNK_BATCH, (epoch["train_samples"], blocks, read_by_two)
    assert state["progress"]["resumes"] == [{"epoch": 0, "batch": stopped["epoch_batches"], "step": stopped["step"]}]
