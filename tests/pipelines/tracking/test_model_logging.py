"""Model logging, registration and loading reach the server they are given, and only it: the
process's default MLflow server is a dead address throughout, and stays the default."""

from __future__ import annotations

import uuid

import mlflow
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking._tracking_service import utils as tracking_defaults
from torch import nn

from pipelines.model_packaging import ClassifierInfo, package
from pipelines.model_registry.champions import CHALLENGER, register_challenger
from pipelines.model_registry.evaluation import load_model
from pipelines.tracking.client import TrackingServer, logged_model_id
from pipelines.tracking.model_logging import log_classifier
from pipelines.tracking.runs import ensure_experiment

DEAD = "http://127.0.0.1:9"
INFO = ClassifierInfo("linear", ["a", "b", "c"], 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 1.0, "bilinear")


@pytest.fixture
def default_server_dead(monkeypatch, mlflow_server):
    monkeypatch.setattr(tracking_defaults, "_tracking_uri", DEAD)
    assert mlflow.get_tracking_uri() == DEAD and mlflow.get_registry_uri() == DEAD


def test_a_model_is_logged_registered_and_loaded_at_its_own_server(mlflow_server, default_server_dead):
    server = TrackingServer.at(mlflow_server)
    client = server.client()
    run_id = client.create_run(ensure_experiment(client, "vitae-model-logging")).info.run_id
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))

    uri = log_classifier(model, INFO, run_id, server)

    model_id = logged_model_id(uri)
    assert model_id is not None, uri
    assert client.get_logged_model(model_id).status == LoggedModelStatus.READY
    assert [output.model_id for output in client.get_run(run_id).outputs.model_outputs] == [model_id]
    name = f"logging-{uuid.uuid4().hex[:8]}"
    version = register_challenger(uri, name, {"dataset_url": "s3://data/x"}, server)
    assert client.get_model_version_by_alias(name, CHALLENGER).version == version
    assert client.get_model_version(name, version).tags == {"dataset_url": "s3://data/x"}
    expected = package(model, INFO).state_dict()
    for model_uri in (uri, f"models:/{name}@{CHALLENGER}", f"models:/{name}/{version}"):
        loaded, info = load_model(model_uri, torch.device("cpu"), server)
        assert info == INFO, model_uri
        assert all(torch.equal(loaded.state_dict()[key], value) for key, value in expected.items()), model_uri
    assert mlflow.get_tracking_uri() == DEAD
