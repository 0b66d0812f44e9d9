"""Registry promotion on a real `mlflow server`, serialised by a lease on the real S3 server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from infra.errors import UserError
from infra.object_store import ObjectStore
from infra.lease import Lease
from pipelines.model_registry import champions
from tests.support.waiting import wait_for


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
    return champions.register_challenger(info.model_uri, model_name, {"quality": quality})


def evaluate_by_tag(delay_s: float = 0.0):
    """Scores a version by reading its tag from the registry (slowly, to open race windows)."""
    from mlflow import MlflowClient

    def evaluate(uri: str) -> dict:
        name, version = uri.removeprefix("models:/").split("/")
        time.sleep(delay_s)
        return {"top1": float(MlflowClient().get_model_version(name, version).tags["quality"])}

    return evaluate


def aliases(model_name: str) -> dict:
    return {alias: champions.alias_version(model_name, alias)
            for alias in (champions.CHAMPION, champions.CHALLENGER, champions.PREVIOUS_CHAMPION)}


def test_better_worse_equal_and_rollback(model_name):
    first = register_version(model_name, 0.80)
    outcome = champions.promote(model_name, evaluate_by_tag())
    assert outcome.promoted and outcome.champion is None and "no champion yet" in outcome.reason
    assert aliases(model_name) == {"champion": first, "challenger": first, "previous-champion": None}

    better = register_version(model_name, 0.90)
    outcome = champions.promote(model_name, evaluate_by_tag(), margin=0.05)
    assert outcome.promoted and (outcome.challenger_score, outcome.champion_score) == (0.90, 0.80)
    assert aliases(model_name) == {"champion": better, "challenger": better, "previous-champion": first}

    worse = register_version(model_name, 0.85)
    outcome = champions.promote(model_name, evaluate_by_tag())
    assert not outcome.promoted and "does not beat" in outcome.reason
    assert aliases(model_name)["champion"] == better

    equal = register_version(model_name, 0.90)
    assert not champions.promote(model_name, evaluate_by_tag()).promoted
    within_margin = register_version(model_name, 0.92)
    assert not champions.promote(model_name, evaluate_by_tag(), margin=0.05).promoted
    assert champions.promote(model_name, evaluate_by_tag(), version=within_margin, margin=0.01).promoted
    assert aliases(model_name)["previous-champion"] == better
    assert {worse, equal} and champions.promote(model_name, evaluate_by_tag()).reason.endswith("already the champion")

    assert champions.rollback(model_name) == (better, within_margin)
    assert aliases(model_name)["champion"] == better and aliases(model_name)["previous-champion"] == within_margin


def test_promote_and_rollback_need_their_aliases(model_name):
    with pytest.raises(UserError, match="no @challenger"):
        champions.promote(model_name, evaluate_by_tag())
    register_version(model_name, 0.5)
    champions.promote(model_name, evaluate_by_tag())
    with pytest.raises(UserError, match="no @previous-champion"):
        champions.rollback(model_name)
    with pytest.raises(UserError, match="metric 'top5'"):
        champions.promote(model_name, evaluate_by_tag(), version=register_version(model_name, 0.6), metric="top5")


def after(signal: threading.Event, wait: threading.Event, evaluate):
    """`evaluate`, first saying it has started (`signal`), then waiting for `wait`."""
    def scored(uri: str) -> dict:
        signal.set()
        assert wait.wait(60), "the other promotion did not get there within 60 s"
        return evaluate(uri)

    return scored


def race(model_name: str, lock_store: ObjectStore | None) -> list[champions.Promotion]:
    """Two promotions at once: challenger A (0.9), and B (0.7) started while A is under way. Without a
    lease, in the worst order: both read the champion before either scores, and B scores once A has
    finished. With one, B starts once A holds the lease."""
    register_version(model_name, 0.5)
    champions.promote(model_name, evaluate_by_tag())
    strong, weak = register_version(model_name, 0.9), register_version(model_name, 0.7)
    outcomes = []
    strong_scoring, weak_scoring, strong_done = threading.Event(), threading.Event(), threading.Event()

    def run(version: str, evaluate, done: threading.Event) -> None:
        lease = Lease(lock_store, f"locks/{model_name}", poll_s=0.1) if lock_store else None
        try:
            outcomes.append(champions.promote(model_name, evaluate, version=version, lease=lease))
        finally:
            done.set()

    if lock_store:
        evaluations = evaluate_by_tag(0.6), evaluate_by_tag()
    else:
        evaluations = (after(strong_scoring, weak_scoring, evaluate_by_tag()),
                       after(weak_scoring, strong_done, evaluate_by_tag()))
    threads = [threading.Thread(target=run, args=(strong, evaluations[0], strong_done)),
               threading.Thread(target=run, args=(weak, evaluations[1], threading.Event()))]
    threads[0].start()
    if lock_store:
        wait_for(lambda: lock_store.head(f"locks/{model_name}") is not None, 60, "promotion A holds the lease")
    else:
        assert strong_scoring.wait(60), "promotion A did not start scoring within 60 s"
    threads[1].start()
    for thread in threads:
        thread.join()
    return outcomes


def test_racing_promotions_never_demote_a_better_model(model_name, lock_store):
    unguarded = f"{model_name}-unguarded"  # control: without the lease the race does demote
    race(unguarded, None)
    assert champions.alias_version(unguarded, champions.CHAMPION) == "3"  # 0.7 replaced the 0.9 model

    outcomes = race(model_name, lock_store)
    assert aliases(model_name)["champion"] == "2" and aliases(model_name)["previous-champion"] == "1"
    assert sorted(o.promoted for o in outcomes) == [False, True]
    loser = next(o for o in outcomes if not o.promoted)
    assert loser.challenger == "3" and loser.champion == "2"
    assert lock_store.head(f"locks/{model_name}") is None  # released


def test_a_second_rollback_is_refused_until_the_next_promotion(model_name):
    first = register_version(model_name, 0.6)
    champions.promote(model_name, evaluate_by_tag())
    second = register_version(model_name, 0.7)
    champions.promote(model_name, evaluate_by_tag())
    assert champions.rollback(model_name) == (first, second)
    with pytest.raises(UserError, match=f"already rolled back from version {second} .*--version {second}"):
        champions.rollback(model_name)  # would swap back to the version rolled back from
    assert aliases(model_name) == {"champion": first, "challenger": second, "previous-champion": second}
    third = register_version(model_name, 0.8)
    assert champions.promote(model_name, evaluate_by_tag()).promoted
    assert champions.rollback(model_name) == (first, third)  # a new promotion can be rolled back


HOLD_UNTIL_KILLED = """
import pathlib, sys, time
from pipelines.model_registry import champions
from pipelines.model_registry.promotion import registry_lease

model_name, lock_url, ready = sys.argv[1:]

def evaluate(model_uri):  # holding the lease: say so, then wait to be killed
    pathlib.Path(ready).touch()
    time.sleep(600)

champions.promote(model_name, evaluate, lease=registry_lease(model_name, lock_url))
"""


def test_a_promotion_killed_while_holding_the_lease_does_not_block_the_next(model_name, lock_store, tmp_path):
    from pipelines.model_registry.promotion import registry_lease

    register_version(model_name, 0.5)
    lock_url, ready = f"s3://{lock_store.bucket}/killed", tmp_path / "holding"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_UNTIL_KILLED, model_name, lock_url, str(ready)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: ready.exists() or holder.poll() is not None, 180, "the holder took the lease")
        assert ready.exists(), f"the holder exited {holder.returncode}: {holder.stdout.read()[-3000:]}"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    lease = registry_lease(model_name, lock_url)
    assert lock_store.head(lease.key) is not None  # the dead process still "holds" it
    lease.timeout_s = 30  # bounded: without breaking dead holders this fails after 30 s, not 1 h
    started = time.monotonic()
    assert champions.promote(model_name, evaluate_by_tag(), lease=lease).promoted
    assert time.monotonic() - started < 10
