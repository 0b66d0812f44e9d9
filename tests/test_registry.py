"""Registry promotion on a real `mlflow server`, serialised by a lease on the real S3 server."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from data_prep.errors import UserError
from data_prep.object_store import ObjectStore
from pipelines import registry
from pipelines.lease import Lease


class ConstantModel:  # a pyfunc model: registration needs a logged model, not a trained one
    def predict(self, context, model_input):
        return model_input


@pytest.fixture(scope="module")
def lock_store(s3_endpoint):
    store = ObjectStore("vitae-test-locks")
    store.client.create_bucket(Bucket=store.bucket)
    return store


@pytest.fixture()
def model_name(mlflow_server):
    return f"registry-test-{uuid.uuid4().hex[:8]}"


def register_version(model_name: str, quality: float) -> str:
    """A new registered version whose (test) quality is stored as a tag, for `evaluate_by_tag`."""
    import mlflow
    import mlflow.pyfunc

    class Model(mlflow.pyfunc.PythonModel, ConstantModel):
        pass

    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=Model())
    return registry.register_challenger(info.model_uri, model_name, {"quality": quality})


def evaluate_by_tag(delay_s: float = 0.0):
    """Scores a version by reading its tag from the registry (slowly, to open race windows)."""
    from mlflow import MlflowClient

    def evaluate(uri: str) -> dict:
        name, version = uri.removeprefix("models:/").split("/")
        time.sleep(delay_s)
        return {"top1": float(MlflowClient().get_model_version(name, version).tags["quality"])}

    return evaluate


def aliases(model_name: str) -> dict:
    return {alias: registry.alias_version(model_name, alias)
            for alias in (registry.CHAMPION, registry.CHALLENGER, registry.PREVIOUS_CHAMPION)}


def test_better_worse_equal_and_rollback(model_name):
    first = register_version(model_name, 0.80)
    outcome = registry.promote(model_name, evaluate_by_tag())
    assert outcome.promoted and outcome.champion is None and "no champion yet" in outcome.reason
    assert aliases(model_name) == {"champion": first, "challenger": first, "previous-champion": None}

    better = register_version(model_name, 0.90)
    outcome = registry.promote(model_name, evaluate_by_tag(), margin=0.05)
    assert outcome.promoted and (outcome.challenger_score, outcome.champion_score) == (0.90, 0.80)
    assert aliases(model_name) == {"champion": better, "challenger": better, "previous-champion": first}

    worse = register_version(model_name, 0.85)
    outcome = registry.promote(model_name, evaluate_by_tag())
    assert not outcome.promoted and "does not beat" in outcome.reason
    assert aliases(model_name)["champion"] == better

    equal = register_version(model_name, 0.90)
    assert not registry.promote(model_name, evaluate_by_tag()).promoted
    within_margin = register_version(model_name, 0.92)
    assert not registry.promote(model_name, evaluate_by_tag(), margin=0.05).promoted
    assert registry.promote(model_name, evaluate_by_tag(), version=within_margin, margin=0.01).promoted
    assert aliases(model_name)["previous-champion"] == better
    assert {worse, equal} and registry.promote(model_name, evaluate_by_tag()).reason.endswith("already the champion")

    assert registry.rollback(model_name) == (better, within_margin)
    assert aliases(model_name)["champion"] == better and aliases(model_name)["previous-champion"] == within_margin


def test_promote_and_rollback_need_their_aliases(model_name):
    with pytest.raises(UserError, match="no @challenger"):
        registry.promote(model_name, evaluate_by_tag())
    register_version(model_name, 0.5)
    registry.promote(model_name, evaluate_by_tag())
    with pytest.raises(UserError, match="no @previous-champion"):
        registry.rollback(model_name)
    with pytest.raises(UserError, match="metric 'top5'"):
        registry.promote(model_name, evaluate_by_tag(), version=register_version(model_name, 0.6), metric="top5")


def race(model_name: str, lock_store: ObjectStore | None) -> list[registry.Promotion]:
    """Two promotions at once: challenger A (0.9) and, a moment later, challenger B (0.7)."""
    register_version(model_name, 0.5)
    registry.promote(model_name, evaluate_by_tag())
    strong, weak = register_version(model_name, 0.9), register_version(model_name, 0.7)
    outcomes = []

    def run(version: str) -> None:
        lease = Lease(lock_store, f"locks/{model_name}", poll_s=0.1) if lock_store else None
        outcomes.append(registry.promote(model_name, evaluate_by_tag(0.6), version=version, lease=lease))

    threads = [threading.Thread(target=run, args=(strong,)), threading.Thread(target=run, args=(weak,))]
    threads[0].start()
    time.sleep(0.2)
    threads[1].start()
    for thread in threads:
        thread.join()
    return outcomes


def test_racing_promotions_never_demote_a_better_model(model_name, lock_store):
    unguarded = f"{model_name}-unguarded"  # control: without the lease the race does demote
    race(unguarded, None)
    assert registry.alias_version(unguarded, registry.CHAMPION) == "3"  # 0.7 replaced the 0.9 model

    outcomes = race(model_name, lock_store)
    assert aliases(model_name)["champion"] == "2" and aliases(model_name)["previous-champion"] == "1"
    assert sorted(o.promoted for o in outcomes) == [False, True]
    loser = next(o for o in outcomes if not o.promoted)
    assert loser.challenger == "3" and loser.champion == "2"
    assert lock_store.head(f"locks/{model_name}") is None  # released


def test_lease_excludes_and_breaks_expired_holders(lock_store):
    key = f"locks/{uuid.uuid4().hex}"
    with Lease(lock_store, key):
        with pytest.raises(UserError, match="still held by"):
            Lease(lock_store, key, timeout_s=0.5, poll_s=0.1).acquire()
    abandoned = Lease(lock_store, key, ttl_s=0.2).acquire()  # its holder "dies" without releasing
    time.sleep(0.4)
    successor = Lease(lock_store, key, timeout_s=2).acquire()
    assert successor.etag != abandoned.etag
    abandoned.release()  # no longer ours: must not delete the successor's lease
    assert lock_store.head(key) is not None
    successor.release()
    assert lock_store.head(key) is None
