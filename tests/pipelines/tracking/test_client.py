"""The MLflow owner's promises that need no server: clients are explicit and leave the default
tracking URI alone, the retry policy is quick unless the user set one, patience is bounded and only
for a server that does not answer, the registry options are light to import."""

from __future__ import annotations

import os
import subprocess
import sys

import time

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from pipelines.tracking.client import (QUICK_RETRIES, TrackingServer, logged_model_id, patiently,
                                       without_credentials)

ELSEWHERE = "http://127.0.0.1:9"


def test_a_client_talks_to_its_own_server_and_leaves_the_process_default_alone():
    before = mlflow.get_tracking_uri()
    client = TrackingServer.at(ELSEWHERE).client()
    assert client.tracking_uri == ELSEWHERE and client._registry_uri == ELSEWHERE
    assert mlflow.get_tracking_uri() == before


def test_a_client_sets_quick_retries_and_a_users_setting_wins(monkeypatch):
    for name in QUICK_RETRIES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    TrackingServer.at(ELSEWHERE).client()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == QUICK_RETRIES["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def no_answer() -> MlflowException:
    return MlflowException("API request failed: connection refused", error_code=INTERNAL_ERROR)


def test_patiently_tries_again_while_the_server_does_not_answer(caplog):
    answers = [no_answer(), no_answer(), "run-1"]

    def call():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    started = time.monotonic()
    assert patiently(call, "opening a run", TrackingServer(ELSEWHERE), patience_s=60) == "run-1"
    assert 3 <= time.monotonic() - started < 10  # pauses of 1 s, then 2 s
    assert [record.message for record in caplog.records if record.name == "pipelines.tracking.client"] == [
        f"the MLflow server {ELSEWHERE} did not answer (opening a run): trying again in {pause} s" for pause in (1, 2)]


def test_patiently_gives_up_after_its_patience_and_never_repeats_a_refusal():
    calls = []

    def refused():
        calls.append(1)
        raise MlflowException("no such experiment", error_code=INVALID_PARAMETER_VALUE)

    with pytest.raises(MlflowException, match="no such experiment"):
        patiently(refused, "opening a run", TrackingServer(ELSEWHERE))
    assert len(calls) == 1

    def unanswered():
        calls.append(1)
        raise no_answer()

    with pytest.raises(MlflowException, match="connection refused"):
        patiently(unanswered, "opening a run", TrackingServer(ELSEWHERE), patience_s=0.5)
    assert len(calls) == 2


def test_only_a_logged_models_uri_has_a_logged_model_id():
    assert logged_model_id("models:/m-0123456789abcdef0123456789abcdef") == "m-0123456789abcdef0123456789abcdef"
    assert logged_model_id("models:/vitae@champion") is None and logged_model_id("runs:/abc/model") is None


def test_a_servers_shown_uri_has_no_credentials():
    assert TrackingServer("https://user:secret@mlflow.example:5000").shown == "https://mlflow.example:5000"
    assert without_credentials("at http://a:b@host/x") == "at http://host/x"


def test_the_registry_options_import_no_torch_ray_or_mlflow():
    heavy = subprocess.run(
        [sys.executable, "-c", "import sys, pipelines.model_registry.options; "
                               "print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert heavy == "[]"
