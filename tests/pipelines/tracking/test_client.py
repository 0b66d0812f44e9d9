"""The MLflow owner's promises that need no server: clients and the default tracking URI are
explicit and scoped, the retry policy is put back, the registry options are light to import."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow

from pipelines.tracking.client import QUICK_RETRIES, TrackingServer, quick_retries, without_credentials

ELSEWHERE = "http://127.0.0.1:9"


def test_a_client_talks_to_its_own_server_and_leaves_the_process_default_alone():
    before = mlflow.get_tracking_uri()
    client = TrackingServer.at(ELSEWHERE).client()
    assert client.tracking_uri == ELSEWHERE and client._registry_uri == ELSEWHERE
    assert mlflow.get_tracking_uri() == before


def test_the_default_server_is_set_for_the_block_only():
    before = mlflow.get_tracking_uri()
    with TrackingServer.at(ELSEWHERE).as_default():
        assert mlflow.get_tracking_uri() == ELSEWHERE
    assert mlflow.get_tracking_uri() == before
    assert TrackingServer.at().uri == before


def test_quick_retries_are_put_back_and_a_users_setting_wins(monkeypatch):
    for name in QUICK_RETRIES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    with quick_retries():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == QUICK_RETRIES["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"


def test_a_servers_shown_uri_has_no_credentials():
    assert TrackingServer("https://user:secret@mlflow.example:5000").shown == "https://mlflow.example:5000"
    assert without_credentials("at http://a:b@host/x") == "at http://host/x"


def test_the_registry_options_import_no_torch_ray_or_mlflow():
    heavy = subprocess.run(
        [sys.executable, "-c", "import sys, pipelines.model_registry.options; "
                               "print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert heavy == "[]"
