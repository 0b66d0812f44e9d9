"""`vitae promote` on the real stack with real evaluation: a trained and an untrained digits model
(the dataset read from the versions' `dataset_url` tag), better / worse / equal / rollback, the
comparison logged to MLflow, the lease released; and the one-line refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
from mlflow import MlflowClient

from infra import object_store
from pipelines.model_registry import champions
from pipelines.cli import main
from pipelines.model_registry.promotion import LOCK_BUCKET_ENV, promote_registered
from pipelines.tracking.runs import MODEL_URI_TAG, RUN_NAME_TAG, ensure_experiment
from tests.support.http_fault_proxy import dead_tracking_uri, mlflow_behind_proxy, tracking_uri
from tests.support.model_helpers import TinyClassifier, digits_dataset, make_classifier, register

pytestmark = pytest.mark.timeout(600)  # a shared 2-core machine can be slow


@pytest.fixture(scope="module")
def data_url(s3_endpoint, mlflow_server) -> str:
    return digits_dataset("promotion")


@pytest.fixture(scope="module")
def trained(data_url) -> TinyClassifier:
    return make_classifier(data_url, epochs=1)


@pytest.fixture(scope="module")
def untrained(data_url) -> TinyClassifier:
    return make_classifier(data_url, epochs=0)


@pytest.fixture(scope="module")
def lock_bucket(s3_endpoint) -> str:
    bucket = f"promotion-locks-{uuid.uuid4().hex[:8]}"
    object_store.make_client().create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture()
def model_name(mlflow_server) -> str:
    return f"promote-test-{uuid.uuid4().hex[:8]}"


def aliases(model_name: str) -> tuple[str | None, str | None, str | None]:
    return tuple(champions.alias_version(model_name, alias)
                 for alias in (champions.CHAMPION, champions.CHALLENGER, champions.PREVIOUS_CHAMPION))


def promote(capsys, model_name: str, lock_bucket: str, *options: str) -> str:
    """The decision line `vitae promote` prints (the next one says where it was logged)."""
    assert main(["promote", "--model", model_name, "--lock-url", f"s3://{lock_bucket}", *options]) == 0
    decision, logged = capsys.readouterr().out.splitlines()
    assert logged == f"logged to the MLflow experiment promotions/{model_name} at {os.environ['MLFLOW_TRACKING_URI']}"
    return decision


def test_better_worse_equal_and_rollback_with_real_evaluation(trained, untrained, data_url, lock_bucket,
                                                              model_name, capsys):
    weak = register(untrained.uri, model_name, data_url)
    assert promote(capsys, model_name, lock_bucket).startswith(f"promoted: no champion yet: version {weak}")

    strong = register(trained.uri, model_name, data_url)
    out = promote(capsys, model_name, lock_bucket, "--margin", "0.05")
    assert out.startswith(f"promoted: version {strong} (top1 ") and f"beats champion version {weak}" in out
    assert aliases(model_name) == (strong, strong, weak)

    worse = register(untrained.uri, model_name, data_url)
    out = promote(capsys, model_name, lock_bucket)
    assert out.startswith(f"not promoted: version {worse}") and f"does not beat champion version {strong}" in out
    equal = register(trained.uri, model_name, data_url)  # the same weights: the same scores
    out = promote(capsys, model_name, lock_bucket, "--data", data_url, "--split", "test")
    assert out.startswith(f"not promoted: version {equal}") and "does not beat" in out
    assert aliases(model_name) == (strong, equal, weak)

    check_logged_comparison(model_name, strong, weak)
    assert object_store.shared_store(lock_bucket).head(f"locks/registry/{model_name}") is None  # released

    # the `ray job submit` entrypoint, the lock bucket from the environment
    env = {**os.environ, LOCK_BUCKET_ENV: lock_bucket}
    done = subprocess.run([sys.executable, "-m", "pipelines.promote", "--model", model_name, "--rollback"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0] == (f"rolled back: {model_name} @champion is version {weak} again "
                                           f"(version {strong} is now @previous-champion)")
    assert aliases(model_name) == (weak, equal, strong)


def check_logged_comparison(model_name: str, strong: str, weak: str) -> None:
    """The run of the promotion of `strong` over `weak`, and the tags on both versions."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(f"promotions/{model_name}")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"params.challenger = '{strong}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params == {"action": "promote", "challenger": strong, "champion": weak, "margin": "0.05",
                               "metric": "top1", "data_url": run.data.params["data_url"], "split": "test"}
    metrics = run.data.metrics
    assert metrics["challenger_top1"] > metrics["champion_top1"] + 0.05
    assert {"challenger_top5", "challenger_loss", "champion_loss"} <= metrics.keys()
    assert metrics["challenger_samples"] == metrics["champion_samples"] == 180
    assert run.info.status == "FINISHED"
    tags = client.get_model_version(model_name, strong).tags
    assert float(tags["eval.top1"]) == metrics["challenger_top1"] and tags["eval.data"].endswith(" [test]")
    assert tags["promotion"].startswith("promoted: ") and tags["promotion.run_id"] == run.info.run_id
    assert float(client.get_model_version(model_name, weak).tags["eval.top1"]) == metrics["champion_top1"]


def test_promote_registered_is_the_sweeps_entry_point(trained, data_url, lock_bucket, model_name, monkeypatch):
    monkeypatch.setenv(LOCK_BUCKET_ENV, lock_bucket)
    version = register(trained.uri, model_name, data_url)
    outcome = promote_registered(model_name, version=version)
    assert isinstance(outcome, champions.Promotion) and outcome.promoted
    assert outcome.challenger_score == pytest.approx(trained.reference_totals("test").metrics()["top1"])
    again = promote_registered(model_name, data_url, split="val", version=version, margin=0.1, metric="top5",
                               lock_url=f"s3://{lock_bucket}/elsewhere")
    assert not again.promoted and again.reason == f"version {version} is already the champion"


def test_promotion_refusals_are_one_line(trained, lock_bucket, model_name, monkeypatch, capsys):
    monkeypatch.delenv(LOCK_BUCKET_ENV, raising=False)
    untagged = champions.register_challenger(trained.uri, model_name, {})
    capsys.readouterr()  # MLflow's registration messages
    cases = [
        (["--model", f"{model_name}-none", "--lock-url", f"s3://{lock_bucket}"], "has no @challenger version"),
        (["--model", model_name], f"version {untagged} has no 'dataset_url' tag: pass --data DEST"),
        (["--model", model_name, "--data", "s3://anywhere/data"],
         f"pass --lock-url s3://BUCKET or set {LOCK_BUCKET_ENV}"),
        (["--model", model_name, "--rollback", "--lock-url", f"s3://{lock_bucket}"], "has no @previous-champion"),
    ]
    for argv, message in cases:
        assert main(["promote", *argv]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error, error


def champion_of_two(model_name: str, trained, untrained, data_url: str, lock_bucket: str, capsys) -> tuple:
    """`model_name` with the trained model @champion, the untrained one @previous-champion and a new
    untrained version @challenger; returns the champions."""
    register(untrained.uri, model_name, data_url)
    promote(capsys, model_name, lock_bucket)
    register(trained.uri, model_name, data_url)
    promote(capsys, model_name, lock_bucket)
    register(untrained.uri, model_name, data_url)
    capsys.readouterr()  # MLflow's registration messages
    return aliases(model_name)


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("vitae: error: ") and "Traceback" not in error, error
    return error


def test_a_failed_champion_read_aborts_promote_and_rollback(trained, untrained, data_url, lock_bucket, model_name,
                                                            mlflow_server, capsys):
    before = champion_of_two(model_name, trained, untrained, data_url, lock_bucket, capsys)
    assert before == ("2", "3", "1")
    with mlflow_behind_proxy(mlflow_server) as proxy:
        proxy.refuse = lambda method, path: (method == "GET" and "registered-models/alias" in path
                                             and "alias=champion" in path)
        for action in ((), ("--rollback",)):
            assert main(["promote", "--model", model_name, "--lock-url", f"s3://{lock_bucket}", *action]) == 2
            error = one_line_error(capsys)
            assert f"the MLflow server {proxy.endpoint} did not answer (" in error and f"{model_name}@champion" in error
        assert proxy.injected("refused") >= 2
    assert aliases(model_name) == before  # nothing changed
    assert object_store.shared_store(lock_bucket).head(f"locks/registry/{model_name}") is None  # released


def test_a_promote_and_rollback_fail_fast_on_a_dead_mlflow(lock_bucket, capsys):
    with tracking_uri(dead_tracking_uri()) as dead:
        for action in ((), ("--rollback",)):
            started = time.monotonic()
            assert main(["promote", "--model", "any", "--lock-url", f"s3://{lock_bucket}", *action]) == 2
            elapsed = time.monotonic() - started
            error = one_line_error(capsys)
            assert f"the MLflow server {dead} did not answer" in error and elapsed < 20, (elapsed, error)


def test_a_register_makes_a_training_runs_model_the_challenger(trained, data_url, model_name, capsys):
    client = MlflowClient()
    experiment_id = ensure_experiment(client, "register-test")
    run_name = f"trained-{uuid.uuid4().hex[:6]}"
    run = client.create_run(experiment_id, tags={RUN_NAME_TAG: run_name, MODEL_URI_TAG: trained.uri})
    client.log_param(run.info.run_id, "data.url", data_url)
    unfinished = f"{run_name}-unfinished"
    client.create_run(experiment_id, tags={RUN_NAME_TAG: unfinished})

    assert main(["register", "--run", run_name, "--name", model_name]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (f"registered models:/{model_name}/1 (@challenger) "
                                                        f"from {trained.uri}")
    assert aliases(model_name) == (None, "1", None)
    tags = client.get_model_version(model_name, "1").tags
    assert tags[champions.DATASET_URL_TAG] == data_url and tags["training_run_id"] == run.info.run_id

    done = subprocess.run([sys.executable, "-m", "pipelines.registration", "--model", trained.uri, "--name",
                           model_name, "--data", data_url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"registered models:/{model_name}/2 (@challenger)" in done.stdout, done.stderr
    assert aliases(model_name) == (None, "2", None)

    for argv, message in [(["--run", unfinished], f"training run {unfinished!r} logged no model"),
                          (["--run", "no-such-run"], "no MLflow run of training run 'no-such-run'"),
                          (["--model", "not a uri"], "'not a uri' is not a model URI"),
                          (["--model", "runs:/0123456789abcdef/model"], "cannot load model runs:/0123456789abcdef/model: ")]:
        assert main(["register", *argv, "--name", model_name]) == 2
        assert message in one_line_error(capsys)
