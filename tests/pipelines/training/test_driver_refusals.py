"""The training driver's refusals on the real stack: a dead Ray address, a request the cluster cannot
hold, and a run name that another driver holds. Each ends in one `vitae: error:` line, before the
run says it starts, and within a bounded time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import filelock
import pytest
from mlflow import MlflowClient

from cluster.net import wait_until
from infra import object_store
from pipelines.training.run_storage import LEASES
from pipelines.tracking.runs import RUN_NAME_TAG
from tests.support.train_helpers import prepare_dataset, tiny_config, train_entrypoint, write_config

pytestmark = pytest.mark.timeout(900)

EPOCHS = 2
CONNECT_BOUND_S = 90  # one attempt of Ray's: 5 s + 5 s + 30 s, plus start-up on a loaded machine


@dataclass
class Setup:
    data_url: str
    storage_url: str
    directory: Path

    def config(self, name: str, storage_url: str | None = None, **sections) -> Path:
        raw = tiny_config(name, self.data_url, storage_url or self.storage_url,
                          schedule={"epochs": EPOCHS, "warmup_epochs": 0.5}, **sections)
        return write_config(self.directory / f"{name}.yaml", raw)


@pytest.fixture(scope="module")
def setup(ray_cluster, tmp_path_factory) -> Setup:
    object_store._CLIENTS.clear()  # clients of this session's S3 server only
    bucket = f"b1-{uuid.uuid4().hex[:8]}"
    object_store.make_client().create_bucket(Bucket=bucket)
    data_url = prepare_dataset("digits", f"s3://{bucket}/digits16", shard_max_samples=400, digits_size=16)
    return Setup(data_url, f"s3://{bucket}/runs", tmp_path_factory.mktemp("b1"))


def run_name() -> str:
    return f"b1-{uuid.uuid4().hex[:8]}"


def train(config_path: Path, *overrides: str, env: dict | None = None, timeout_s: float = 240):
    return subprocess.run(train_entrypoint(config_path, *overrides), capture_output=True, text=True,
                          env=env, timeout=timeout_s)


def start_train(config_path: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(train_entrypoint(config_path), stdout=log, stderr=subprocess.STDOUT, text=True)


def assert_refused(done: subprocess.CompletedProcess, message: str) -> str:
    """The run ended with exit 2 in one `vitae: error:` line holding `message`, before it started."""
    output = f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert done.returncode == 2, output
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("vitae: error: ") and message in last, output
    assert "Traceback" not in done.stderr and "starting" not in done.stdout, output
    return last


def wait_for(check, what: str, process: subprocess.Popen, log_path: Path, timeout_s: float = 240) -> None:
    try:
        wait_until(check, what, timeout_s, process)
    except (TimeoutError, RuntimeError) as error:
        pytest.fail(f"{error}\n{log_path.read_text()[-4000:]}")


def test_a_dead_ray_address_ends_in_one_line_naming_it_within_a_bounded_time(setup):
    started = time.monotonic()
    done = train(setup.config(run_name()), env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"},
                 timeout_s=CONNECT_BOUND_S + 60)
    elapsed = time.monotonic() - started
    assert_refused(done, "no Ray cluster answered at 127.0.0.1:1 (RAY_ADDRESS)")
    assert elapsed < CONNECT_BOUND_S, f"{elapsed:.0f}s"


@pytest.mark.parametrize("override, needs, has", [
    ("scaling.resources_per_worker={CPU: 100}", "needs CPU 200", "has CPU 8"),
    ("scaling.use_gpu=true", "needs GPU 2", "has GPU 0"),
    ("scaling.resources_per_worker={CPU: 1, vitae_accelerator: 1}", "vitae_accelerator 2", "vitae_accelerator 0"),
])
def test_resources_the_cluster_cannot_hold_are_refused_up_front(setup, override, needs, has):
    last = assert_refused(train(setup.config(run_name()), override, timeout_s=180), needs)
    assert has in last and "(2 workers)" in last, last


def lease_key(storage_url: str, name: str) -> str:
    return f"{object_store.parse_s3_url(storage_url).key}/{LEASES}/{name}"


def test_a_second_driver_of_a_run_name_is_refused_naming_the_holder(setup, tmp_path):
    name, log_path = run_name(), tmp_path / "first.log"
    config_path = setup.config(name)
    location = object_store.parse_s3_url(setup.storage_url)
    store = object_store.shared_store(location.bucket)
    first = start_train(config_path, log_path)
    try:
        wait_for(lambda: store.head(lease_key(setup.storage_url, name)) is not None, "the first driver's lease",
                 first, log_path)
        last = assert_refused(train(config_path), f"run {name} is being trained by another driver")
        assert f":{first.pid} " in last, last
        assert first.wait(timeout=600) == 0, log_path.read_text()[-4000:]
    finally:
        first.kill()
    assert store.head(lease_key(setup.storage_url, name)) is None  # released at the end
    listing = store.client.list_objects_v2(Bucket=location.bucket, Prefix=f"{location.key}/{name}/checkpoint_",
                                           Delimiter="/")
    checkpoints = [prefix["Prefix"] for prefix in listing.get("CommonPrefixes", [])]
    assert len(checkpoints) == EPOCHS, checkpoints  # num_to_keep 2: one driver's two epochs
    assert_one_intact_mlflow_run(name)


def assert_one_intact_mlflow_run(name: str) -> None:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("vitae-tests").experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    assert len(runs) == 1, [run.info.run_id for run in runs]
    run_id = runs[0].info.run_id
    assert sorted(point.step for point in client.get_metric_history(run_id, "epoch")) == list(range(1, EPOCHS + 1))
    everywhere = [experiment.experiment_id for experiment in client.search_experiments()]  # Model.log's own
    models = client.search_logged_models(everywhere, filter_string=f"source_run_id = '{run_id}'")
    assert len(models) == 1, [model.model_id for model in models]


def test_a_run_name_in_a_local_directory_is_held_too(setup, tmp_path):
    name, log_path = run_name(), tmp_path / "first.log"
    storage = tmp_path / "runs"
    config_path = setup.config(name, str(storage))
    lock_path = storage / LEASES / f"{name}.lock"
    first = start_train(config_path, log_path)
    try:
        wait_for(lambda: lock_path.exists() and lock_path.read_text().endswith(f":{first.pid}"),
                 "the first driver's lock", first, log_path)
        last = assert_refused(train(config_path), f"run {name} is being trained by another driver")
        assert f":{first.pid}" in last and str(lock_path) in last, last
    finally:
        first.kill()
        first.wait(timeout=60)
    with filelock.FileLock(str(lock_path), timeout=0):  # ended with its holder
        assert oct(lock_path.stat().st_mode & 0o777) == oct(0o600)


def test_ctrl_c_releases_the_lease(setup, tmp_path):
    name, log_path = run_name(), tmp_path / "first.log"
    store = object_store.shared_store(object_store.parse_s3_url(setup.storage_url).bucket)
    first = start_train(setup.config(name), log_path)
    try:
        wait_for(lambda: store.head(lease_key(setup.storage_url, name)) is not None, "the driver's lease",
                 first, log_path)
        first.send_signal(signal.SIGINT)
        code = first.wait(timeout=120)
    finally:
        first.kill()
    assert code != 0, log_path.read_text()[-4000:]
    assert store.head(lease_key(setup.storage_url, name)) is None, log_path.read_text()[-4000:]
