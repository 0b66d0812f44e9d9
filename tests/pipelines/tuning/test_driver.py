"""The sweep (`vitae tune`) on the real stack (moto S3 server, `mlflow server`, the session's Ray head).

Config validation and the concurrency derivation are unit tests. Everything else is one scenario,
because every trial is a Ray Train run (~20 s of start-up here): a sweep of three trials of a
one-cell model on digits at 16 px, one trial at a time, is submitted with `ray job submit`, stopped
once a trial has finished and the next one has a checkpoint, and submitted again with `--resume`,
which completes it, registers the best trial and promotes it. With seed 1, random search samples
the learning rates 8e-3, 8e-3, 1e-6 (Ray 2.60): the first two train identically, and ASHA (one
rung, at epoch 1) has a hopeless third trial to stop.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

from cluster.credentials import CREDENTIAL_VARIABLES
from infra import object_store
from infra.errors import UserError
from pipelines.model_registry import champions
from pipelines.training.ray_cluster import ClusterCapacity, require_resources
from pipelines.training.run_storage import RunStorage
from pipelines.tuning.config import load_sweep, trial_run_name
from pipelines.tracking.runs import PARENT_RUN_TAG, RUN_NAME_TAG, SWEEP_NAME_TAG
from pipelines.tuning.driver import derive_concurrency, trial_resources, warn_of_copied_credentials
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.support.train_helpers import prepare_dataset, tiny_config

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[3]

SAMPLES, EPOCHS = 3, 3
LEARNING_RATES = [1.6e-2, 8e-3, 1e-6]
SEED = 1
EXPERIMENT = "vitae-tune-tests"
COPIED_CREDENTIALS_WARNING = "warning: Ray Tune copies "


def sweep_dict(name: str, data_url: str, storage_url: str, **sections) -> dict:
    """A sweep of the tiny training run over the learning rate; `sections` update the defaults."""
    sweep = {
        "name": name,
        "base": tiny_config("ignored", data_url, storage_url, mlflow={"experiment": EXPERIMENT}),
        "overrides": {"schedule.epochs": EPOCHS},
        "search": {"num_samples": SAMPLES, "seed": SEED,
                   "space": {"optim.lr": {"kind": "choice", "values": LEARNING_RATES}}},
        "asha": {"grace_period": 1, "reduction_factor": 3},  # one rung, at epoch 1: the top third goes on
        "trial": {"num_workers": 1, "driver_cpus": 1},  # DDP across workers: see test_train_job
    }
    for section, values in sections.items():
        sweep[section] = {**sweep.get(section, {}), **values} if isinstance(values, dict) else values
    return sweep


def write_sweep(path: Path, sweep: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


# --- the config and the concurrency: no cluster ---------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("search.space.model.mlpratio={kind: choice, values: [2]}",
     "search.space.model.mlpratio: not a training-config field (model has: name, img_size, depth, mlp_ratio"),
    ("search.space.optim.lr={kind: normal, low: 1, high: 2}",
     "invalid sweep config: search.space.optim.lr: Input tag 'normal' found using 'kind' does not match"),
    ("search.space.optim.lr={kind: loguniform, low: 0, high: 1}",
     "search.space.optim.lr.loguniform.low: Input should be greater than 0"),
    ("search.space.optim.lr={kind: uniform, low: 0.1, high: 0.01}", "expected low < high"),
    ("search.space.model.depth={kind: randint, low: 0, high: 3}",
     "search.space.model.depth: 0 does not make a valid training config: model.depth: Input should be greater than"),
    ("search.space.model={kind: choice, values: [1]}", "search.space.model: a section, not a field"),
    ("search.space.scaling.num_workers={kind: choice, values: [1, 2]}",
     "search.space.scaling.num_workers: not searchable: per-trial resources are set in trial"),
    ("search.space.schedule.epochs={kind: choice, values: [1, 2]}", "not searchable: it is ASHA's max_t"),
    ("asha.grace_period=4", "asha.grace_period: 4 is more than the trials' schedule.epochs (3)"),
    ("overrides.model.depht=2", "base (inline, with overrides): invalid config: model.depht: unknown key"),
    ("serach.num_samples=2", "invalid sweep config: serach: unknown key"),
    ("registry.promote=true", "promote needs registry.model_name"),
    # absurd values: refused at once
    ("search.space.optim.lr={kind: loguniform, low: 1.0e-3, high: .inf}",
     "search.space.optim.lr.loguniform.high: Input should be a finite number"),
    ("search.space.optim.lr={kind: choice, values: [0.1, .nan]}",
     "search.space.optim.lr.choice.values: expected finite numbers, got [0.1, nan]"),
    ("search.space.model.depth={kind: randint, low: 1, high: 100000}",
     "search.space.model.depth: 99999 does not make a valid training config: model.depth: Input should be less "
     "than or equal to 64"),
    ("overrides.optim.lr=.inf", "base (inline, with overrides): invalid config: optim.lr: Input should be a finite"),
    ("search.num_samples=1000000000", "search.num_samples: Input should be less than or equal to 10000"),
    ("search.seed=-1", "search.seed: Input should be greater than or equal to 0"),
    ("asha.reduction_factor=.inf", "asha.reduction_factor: Input should be a finite number"),
    ("trial.driver_cpus=.nan", "trial.driver_cpus: Input should be a finite number"),
    ("registry.margin=.inf", "registry.margin: Input should be a finite number"),
])
def test_a_bad_sweep_config_is_one_error_naming_the_field(tmp_path, override, message):
    path = write_sweep(tmp_path / "sweep.yaml", sweep_dict("bad", "s3://data/digits", "s3://ckpt/runs"))
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        load_sweep(path, [override])
    assert message in str(error.value) and "\n" not in str(error.value)
    assert time.monotonic() - started < 20, "validation is not cheap"  # milliseconds when quiet; seconds under load


def test_a_sweep_config_resolves_its_base_and_space(tmp_path):
    write_sweep(tmp_path / "base.yaml", tiny_config("base-run", "s3://data/digits", "s3://ckpt/runs"))
    raw = {**sweep_dict("resolved", "", ""), "base": "base.yaml",
           "overrides": {"schedule": {"epochs": 5}, "model.depth": 2},  # nested sections or dotted keys
           "trial": {"num_workers": 3, "gpus_per_worker": 0.5}}
    sweep = load_sweep(write_sweep(tmp_path / "sweep.yaml", raw),
                       ["search.space.optim.weight_decay={kind: uniform, low: 0.0, high: 0.1}"])
    assert (sweep.base.name, sweep.max_t, sweep.base.model.depth) == ("resolved", 5, 2)
    assert sweep.base.scaling.num_workers == 3 and sweep.base.scaling.use_gpu
    assert sweep.base.scaling.resources_per_worker == {"CPU": 1, "GPU": 0.5}
    assert list(sweep.config.search.space) == ["optim.lr", "optim.weight_decay"]
    trial = sweep.trial_config("abc12_00003", {"optim.lr": 8e-3, "optim.weight_decay": 0.02})
    assert (trial.name, trial.optim.lr, trial.optim.weight_decay) == ("resolved-abc12_00003", 8e-3, 0.02)
    assert trial_resources(sweep) == {"CPU": 1 + 3 * 1, "GPU": 3 * 0.5}  # the driver and three workers


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*_sweep.yaml")), ids=lambda p: p.name)
def test_example_sweeps_validate(path):
    sweep = load_sweep(path)
    assert sweep.config.search.num_samples >= 4 and sweep.config.asha.enabled
    assert set(sweep.config.search.space) == {"model.mlp_ratio", "model.depth", "optim.lr"}


@pytest.mark.parametrize("cluster, per_trial, samples, cap, trials, binding", [
    ({"CPU": 8.0, "memory": 1e10}, {"CPU": 3.0}, 4, None, 2, "CPU: 8 // 3"),  # 2 workers + the trial driver
    ({"CPU": 8.0}, {"CPU": 2.5}, 8, None, 3, "CPU: 8 // 2.5"),  # a fractional driver
    ({"CPU": 64.0, "GPU": 8.0}, {"CPU": 5.0, "GPU": 4.0}, 10, None, 2, "GPU: 8 // 4"),
    ({"CPU": 64.0}, {"CPU": 3.0}, 4, None, 4, "num_samples 4"),
    ({"CPU": 64.0}, {"CPU": 3.0}, 40, 5, 5, "max_concurrent_trials 5"),
])
def test_concurrency_leaves_room_for_every_trials_workers(cluster, per_trial, samples, cap, trials, binding):
    concurrency = derive_concurrency(cluster, per_trial, samples, cap)
    assert concurrency.trials == trials
    assert binding in concurrency.explanation and f"{trials} trial(s) at a time" in concurrency.explanation


@pytest.mark.parametrize("cluster, per_trial, message", [
    ({"CPU": 2.0}, {"CPU": 3.0}, "a trial needs CPU 3 but the cluster has CPU 2"),
    ({"CPU": 8.0}, {"CPU": 1.0, "GPU": 1.0}, "a trial needs CPU 1, GPU 1 but the cluster has CPU 8, GPU 0"),
])
def test_a_trial_larger_than_the_cluster_is_refused(cluster, per_trial, message):
    with pytest.raises(UserError, match=message):
        require_resources(per_trial, ClusterCapacity(cluster, "has"), "a trial", "use fewer workers")


# --- the scenario: interrupted, resumed, registered, promoted ------------------------------------

@dataclass
class AtStop:
    """What the first job had done when it was stopped."""

    finished: dict[str, dict]  # trial id -> its last result (Tune's stored state)
    checkpointed: dict[str, int]  # run name -> epochs in its checkpoint, for trials not finished
    finished_runs: dict[str, tuple[str, int, list]]  # run name -> (status, end time, epoch history) in MLflow


@dataclass
class Scenario:
    sweep_path: Path
    model_name: str
    data_url: str
    first_status: str
    first_logs: str
    at_stop: AtStop
    second: subprocess.CompletedProcess

    @property
    def sweep(self):
        return load_sweep(self.sweep_path)

    @property
    def parent(self):
        return sweep_run(self.sweep.name)

    @property
    def children(self) -> dict:
        client = MlflowClient()
        runs = client.search_runs([self.parent.info.experiment_id],
                                  filter_string=f"tags.`{PARENT_RUN_TAG}` = '{self.parent.info.run_id}'")
        names = [run.data.tags[RUN_NAME_TAG] for run in runs]
        assert len(names) == len(set(names)), names  # one MLflow run per trial
        return dict(zip(names, runs))

    @property
    def table(self) -> list[dict]:
        return trials_table(self.sweep.name, self.sweep_path.parent)


def sweep_run(sweep_name: str):
    """The sweep's own MLflow run."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`{SWEEP_NAME_TAG}` = '{sweep_name}'")
    assert len(runs) == 1, [run.info.run_id for run in runs]
    return runs[0]


def trials_table(sweep_name: str, directory: Path) -> list[dict]:
    """The sweep's trials.csv, as logged to its MLflow run."""
    import pandas

    path = MlflowClient().download_artifacts(sweep_run(sweep_name).info.run_id, "trials.csv", str(directory))
    return pandas.read_csv(path).to_dict("records")


def epoch_history(run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, "val_top1"))


def ray_job(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", *args],
                          capture_output=True, text=True, timeout=480)
    if check:
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    return done


def tune_entrypoint(sweep_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.tune", "--config", str(sweep_path), *args]


def trial_statuses(storage: RunStorage, sweep_name: str) -> dict[str, tuple[str, dict]]:
    """Trial id -> (status, last result), as the experiment state in storage has them."""
    import logging

    from ray.tune import ExperimentAnalysis

    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)  # results not synced yet
    try:
        trials = ExperimentAnalysis(f"{storage.path}/{sweep_name}", storage_filesystem=storage.filesystem).trials
    except Exception:  # no experiment state stored yet
        return {}
    return {trial.trial_id: (trial.status, trial.last_result) for trial in trials}


def checkpointed_runs(storage_url: str, sweep_name: str) -> dict[str, int]:
    """Training run name -> epochs in its latest checkpoint, for the sweep's runs that have one."""
    location = object_store.parse_s3_url(storage_url)
    store = object_store.shared_store(location.bucket)
    listing = store.client.list_objects_v2(Bucket=location.bucket, Prefix=f"{location.key}/{sweep_name}-",
                                           Delimiter="/")
    names = [prefix["Prefix"].rstrip("/").rsplit("/", 1)[1] for prefix in listing.get("CommonPrefixes", [])]
    storage = RunStorage.open(storage_url)
    epochs = {}
    for name in names:
        if not store.head(f"{location.key}/{name}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}"):
            continue
        try:
            epochs[name] = storage.previous_result(name).metrics["epoch"]
        except CheckpointManagerInitializationError:  # a read racing Ray's rewrite came back torn from
            continue  # moto (seen once under load, as unparseable JSON): the next poll reads it whole
    return epochs


def stop_when_a_trial_finished_and_another_checkpointed(submission_id: str, sweep_name: str, storage_url: str,
                                                       timeout_s: float = 300) -> tuple[str, AtStop]:
    from ray.job_submission import JobSubmissionClient

    storage = RunStorage.open(storage_url)
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, "no finished and checkpointed trials within the time limit"
        time.sleep(1.0)
        checkpointed = {name: epoch for name, epoch in checkpointed_runs(storage_url, sweep_name).items()
                        if epoch < EPOCHS}
        if not checkpointed:
            continue
        finished = {trial_id: result for trial_id, (status, result) in trial_statuses(storage, sweep_name).items()
                    if status == "TERMINATED"}
        finished_names = {trial_run_name(sweep_name, trial_id) for trial_id in finished}
        checkpointed = {name: epoch for name, epoch in checkpointed.items() if name not in finished_names}
        if finished and checkpointed:
            break
    client = JobSubmissionClient()
    client.stop_job(submission_id)
    while not (status := client.get_job_status(submission_id)).is_terminal():
        time.sleep(0.2)
    runs = {run.data.tags[RUN_NAME_TAG]: run for run in MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` LIKE '{sweep_name}-%'")}
    finished_runs = {name: (runs[name].info.status, runs[name].info.end_time, epoch_history(runs[name].info.run_id))
                     for name in finished_names}
    return str(status), AtStop(finished, checkpointed, finished_runs)


@dataclass(frozen=True)
class SweepData:
    data_url: str  # digits at 16 px
    checkpoint_bucket: str


@pytest.fixture(scope="module")
def sweep_data(ray_cluster) -> SweepData:
    object_store._CLIENTS.clear()  # clients of this session's S3 server only
    data_bucket, checkpoint_bucket = f"tune-data-{uuid.uuid4().hex[:8]}", f"tune-ckpt-{uuid.uuid4().hex[:8]}"
    for bucket in (data_bucket, checkpoint_bucket):
        object_store.make_client().create_bucket(Bucket=bucket)
    data_url = prepare_dataset("digits", f"s3://{data_bucket}/digits16", shard_max_samples=170, digits_size=16)
    return SweepData(data_url, checkpoint_bucket)


@pytest.fixture(scope="module")
def scenario(sweep_data, tmp_path_factory) -> Scenario:
    data_url, checkpoint_bucket = sweep_data.data_url, sweep_data.checkpoint_bucket
    storage_url, model_name, name = f"s3://{checkpoint_bucket}/sweeps", f"tune-test-{uuid.uuid4().hex[:6]}", "lr-sweep"
    sweep_path = write_sweep(tmp_path_factory.mktemp("tune") / "sweep.yaml", sweep_dict(
        name, data_url, storage_url, max_concurrent_trials=1,  # a trial runs while the one before has finished
        registry={"model_name": model_name, "promote": True, "lock_url": f"s3://{checkpoint_bucket}"}))

    submission_id = f"tune-{uuid.uuid4().hex[:8]}"
    ray_job("submit", "--no-wait", "--submission-id", submission_id, "--", *tune_entrypoint(sweep_path))
    first_status, at_stop = stop_when_a_trial_finished_and_another_checkpointed(submission_id, name, storage_url)
    first_logs = ray_job("logs", submission_id).stdout
    second = ray_job("submit", "--", *tune_entrypoint(sweep_path, "--resume"), check=False)
    return Scenario(sweep_path, model_name, data_url, first_status, first_logs, at_stop, second)


def test_an_interrupted_sweep_resumes_keeping_its_finished_trials(scenario):
    assert "STOPPED" in scenario.first_status, scenario.first_status
    output = scenario.second.stdout + scenario.second.stderr
    assert scenario.second.returncode == 0, output[-6000:]
    assert "resuming from s3://" in output and "Trial status:" in output  # Ray's trial table
    assert "a trial needs CPU 2 (driver and workers); cluster CPU 8 -> 1 trial(s) at a time" in output
    table = {row["trial_id"]: row for row in scenario.table}
    assert len(table) == SAMPLES
    for trial_id, result in scenario.at_stop.finished.items():
        assert (table[trial_id]["epochs"], table[trial_id]["val_top1"]) == (result["epoch"], result["val_top1"])
    children = scenario.children
    for name, (status, end_time, history) in scenario.at_stop.finished_runs.items():  # not trained again
        assert epoch_history(children[name].info.run_id) == history
        if status == "FINISHED":  # (a trial stopped early is only marked KILLED when the sweep ends)
            assert children[name].info.end_time == end_time


def test_unfinished_trials_resume_from_their_checkpoints(scenario):
    children = scenario.children
    for name, checkpointed_epochs in scenario.at_stop.checkpointed.items():
        epochs = [step for step, _ in epoch_history(children[name].info.run_id)]
        # the epochs in the checkpoint were logged once: the training run went on from there
        assert all(epochs.count(epoch) == 1 for epoch in range(1, checkpointed_epochs + 1)), (name, epochs)
        assert max(epochs) > checkpointed_epochs


def test_asha_stops_the_hopeless_trial_early(scenario):
    rows = scenario.table
    assert sorted(row["optim.lr"] for row in rows) == sorted([8e-3, 8e-3, 1e-6])  # seeded random search
    hopeless = next(row for row in rows if row["optim.lr"] == 1e-6)
    assert hopeless["status"] == "stopped early" and hopeless["epochs"] < EPOCHS
    assert all(row["epochs"] == EPOCHS and row["status"] == "completed" for row in rows if row is not hopeless)
    assert scenario.children[hopeless["run_name"]].info.status == "KILLED"
    assert MlflowClient().get_run(scenario.parent.info.run_id).data.metrics["trial_epochs"] < SAMPLES * EPOCHS


def test_trials_are_mlflow_runs_nested_under_the_sweeps_run(scenario, tmp_path):
    parent, children = scenario.parent, scenario.children
    assert parent.info.status == "FINISHED"
    assert sorted(children) == sorted(row["run_name"] for row in scenario.table)
    assert all(run.data.params["mlflow.parent_run_id"] == parent.info.run_id for run in children.values())
    assert json.loads(parent.data.params["search.optim.lr"]) == {"kind": "choice", "values": LEARNING_RATES}
    assert parent.data.params["max_concurrent_trials"] == "1"
    artifacts = {artifact.path for artifact in MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "trials.csv", "trials.png"} <= artifacts
    png = Path(MlflowClient().download_artifacts(parent.info.run_id, "trials.png", str(tmp_path))).read_bytes()
    assert png.startswith(b"\x89PNG")


def test_the_best_trial_is_registered_as_challenger_with_its_lineage(scenario):
    best = max((row for row in scenario.table if row["status"] == "completed"), key=lambda row: row["val_top1"])
    version = champions.alias_version(scenario.model_name, champions.CHALLENGER)
    details = MlflowClient().get_model_version(scenario.model_name, version)
    tags, run = details.tags, scenario.children[best["run_name"]]
    assert details.run_id == tags["training_run_id"] == run.info.run_id
    location = object_store.parse_s3_url(scenario.data_url)
    manifest = object_store.shared_store(location.bucket).get_bytes(f"{location.key}/manifest.parquet")
    assert tags["dataset_manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    assert (tags["trial_id"], tags["sweep_run_id"], tags["dataset_url"]) == (
        best["trial_id"], scenario.parent.info.run_id, scenario.data_url)
    assert float(tags["val_top1"]) == pytest.approx(best["val_top1"]) and {"val_top5", "val_loss"} <= set(tags)
    assert (tags["architecture"], tags["depth"], tags["mlp_ratio"], float(tags["lr"])) == (
        "vitae_t", "1", "model default", best["optim.lr"])
    assert f"best trial {best['trial_id']}" in scenario.second.stdout


def test_promotion_runs_at_the_end_when_configured(scenario):
    challenger = champions.alias_version(scenario.model_name, champions.CHALLENGER)
    assert champions.alias_version(scenario.model_name, champions.CHAMPION) == challenger  # there was no champion
    assert "promotion: no champion yet" in scenario.second.stdout
    assert scenario.parent.data.tags["vitae.promoted"] == "True"


def test_no_secret_reaches_mlflow_or_the_logs(scenario, tmp_path):
    parent = scenario.parent
    config_text = Path(MlflowClient().download_artifacts(parent.info.run_id, "config.yaml", str(tmp_path))).read_text()
    texts = [config_text, json.dumps(parent.data.params), json.dumps(parent.data.tags), scenario.first_logs,
             scenario.second.stdout, scenario.second.stderr]
    for secret in (TEST_ACCESS_KEY, TEST_SECRET_KEY, os.environ["RAY_AUTH_TOKEN"]):
        assert not any(secret in text for text in texts)
    assert not any(COPIED_CREDENTIALS_WARNING in text for text in texts)  # the head hands out a file


def test_the_sweep_driver_warns_of_credential_variables_ray_tune_would_copy(monkeypatch, capsys):
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    warn_of_copied_credentials()
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "planted-key")
    warn_of_copied_credentials()
    warning = capsys.readouterr().err
    assert warning.startswith(COPIED_CREDENTIALS_WARNING + "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY into")
    assert "planted" not in warning and warning.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    ((), "sweep lr-sweep exists in s3://"),
    (("--resume", "--set", "name=never-ran"), "no sweep never-ran to resume in s3://"),
    (("--set", "search.space.optim.lrr={kind: choice, values: [0.1]}"),
     "search.space.optim.lrr: not a training-config field"),
])
def test_the_driver_refuses_before_using_the_cluster(scenario, args, message):
    done = subprocess.run(tune_entrypoint(scenario.sweep_path, *args), capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitae: error: ") and message in lines[0], lines


# --- an interrupted sweep ------------------------------------------------------------------------

class Output:
    """A process's output, read line by line on a thread, so that a test can wait for a line."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout_s: float) -> bool:
        """Whether a line matching `pattern` came within `timeout_s` (False at once when the output ended)."""
        with self._changed:
            self._changed.wait_for(lambda: self.ended or any(re.search(pattern, line) for line in self.lines),
                                   timeout_s)
            return any(re.search(pattern, line) for line in self.lines)

    @property
    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)


# With seed 1, trial 0 samples 8e-3 and trial 1 the hopeless 1e-6 (Ray 2.60's random search).
RUNG_LEARNING_RATES = [8e-3, 1e-6]


def stopped_early(table: list[dict]) -> set[tuple[str, float]]:
    """(trial number, learning rate) of the trials ASHA stopped (trial ids differ between sweeps)."""
    return {(row["trial_id"].rsplit("_", 1)[1], row["optim.lr"]) for row in table if row["status"] == "stopped early"}


def test_an_interrupted_sweep_registers_nothing_and_resumes_with_ashas_rungs(sweep_data, tmp_path):
    """One trial at a time, ASHA's one rung at epoch 1 of 2. Trial 0 passes the rung (its result is
    recorded there) and completes; the sweep is interrupted as trial 1 starts, then resumed. Trial 1
    reaches the rung after the resume: ASHA stops it against trial 0's recorded result, as in the
    same sweep run without interruption beside it. Without the restored rungs, trial 1 would meet
    an empty rung and run on."""
    model_name = f"interrupt-test-{uuid.uuid4().hex[:6]}"
    sections = dict(overrides={"schedule.epochs": 2}, max_concurrent_trials=1,
                    search={"num_samples": 2, "space": {"optim.lr": {"kind": "choice", "values": RUNG_LEARNING_RATES}}})
    whole_path = write_sweep(tmp_path / "whole.yaml", sweep_dict(
        "uninterrupted", sweep_data.data_url, f"s3://{sweep_data.checkpoint_bucket}/uninterrupted", **sections))
    sweep_path = write_sweep(tmp_path / "sweep.yaml", sweep_dict(
        "interrupted", sweep_data.data_url, f"s3://{sweep_data.checkpoint_bucket}/interrupted", **sections,
        registry={"model_name": model_name}))
    (tmp_path / "whole").mkdir()
    whole = subprocess.Popen(tune_entrypoint(whole_path), cwd=REPO, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    whole_output = Output(whole)
    sweep = subprocess.Popen(tune_entrypoint(sweep_path, "--set", "max_concurrent_trials=1"), cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = Output(sweep)
    try:
        # one trial at a time: once the second has started, the first has ended
        assert output.wait_for(r"Trial \S+_00001 started", timeout_s=400), output.text[-6000:]
        sweep.send_signal(signal.SIGINT)  # as Ctrl+C
        assert sweep.wait(timeout=240) == 130, output.text[-6000:]
        command = f"vitae tune --config {sweep_path} --set max_concurrent_trials=1 --resume"
        # trial 1 had not reached the rung: its decision comes after the resume
        assert (f"vitae: interrupted: sweep interrupted stopped with 1 of 2 trials ended, nothing registered; "
                f"continue it with: {command}") in output.text, output.text[-6000:]
        assert "Tuner.restore(" not in output.text
        assert MlflowClient().search_model_versions(f"name = '{model_name}'") == []

        resumed = subprocess.run([sys.executable, "-m", "pipelines.cli", *shlex.split(command)[1:]], cwd=REPO,
                                 capture_output=True, text=True, timeout=480)
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-6000:]
        assert whole.wait(timeout=480) == 0, whole_output.text[-6000:]
    finally:
        sweep.kill()
        whole.kill()
    assert champions.alias_version(model_name, champions.CHALLENGER) == "1"
    table = trials_table("interrupted", tmp_path)
    assert [(row["optim.lr"], row["epochs"], row["status"]) for row in table] == [
        (8e-3, 2, "completed"), (1e-6, 1, "stopped early")]
    assert stopped_early(table) == stopped_early(trials_table("uninterrupted", tmp_path / "whole")) == {("00001", 1e-6)}
