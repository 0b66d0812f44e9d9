"""Model logging, owned here: a trained model packaged (`model_packaging.package`) and logged to its
MLflow run's server as an MLflow logged model with the project's flavour (`pipelines.serving`),
once per run, its URI recorded in the run's `vitae.model_uri` tag."""

from __future__ import annotations

import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model
from torch import nn

from pipelines import serving
from pipelines.model_packaging import ClassifierInfo, package
from pipelines.tracking.client import TrackingServer, patiently
from pipelines.tracking.runs import MODEL_URI_TAG

MODEL_NAME = "model"  # the logged model's name within its run
MODEL_WEIGHTS_TAG = "vitae.model_weights"  # which weights were logged (e.g. "ema")
DISTRIBUTION = "vitae-pipeline"  # the model's classes and its pyfunc loader come from this package


class ModelLog:
    """The model of MLflow run `run_id`."""

    def __init__(self, server: TrackingServer, client: MlflowClient, run_id: str):
        self.server, self.client, self.run_id = server, client, run_id

    @property
    def uri(self) -> str | None:
        """The logged model's URI; None before it is logged."""
        return self.client.get_run(self.run_id).data.tags.get(MODEL_URI_TAG)

    def log(self, model: nn.Module, info: ClassifierInfo, source: str) -> str:
        """Log the final model; `source` says which weights (e.g. "ema")."""
        return patiently(lambda: self._log(model, info, source), f"logging the model of run {self.run_id}",
                         self.server)

    def _log(self, model: nn.Module, info: ClassifierInfo, source: str) -> str:
        uri = log_classifier(model, info, self.run_id, self.server)
        self.client.set_tag(self.run_id, MODEL_URI_TAG, uri)
        self.client.set_tag(self.run_id, MODEL_WEIGHTS_TAG, source)
        return uri


def log_classifier(model: nn.Module, info: ClassifierInfo, run_id: str, server: TrackingServer | None = None) -> str:
    """Log `model` to the MLflow run `run_id` (which must exist) of `server` (default: the
    environment's) as a logged model (created, its files uploaded, then marked ready) that the run
    lists among its outputs; return the logged model's URI."""
    client = (server or TrackingServer.at()).client()
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                        params=run.data.params)
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        description = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                            metadata=info.metadata(), model_id=logged.model_id)
        with tempfile.TemporaryDirectory(prefix="vitae-model-") as directory:
            files = str(Path(directory) / MODEL_NAME)
            serving.save_model(package(model, info), files, mlflow_model=description, signature=serving.signature(),
                               input_example=serving.input_example(info.img_size), pip_requirements=requirements())
            client.log_model_artifacts(logged.model_id, files)
    except BaseException:
        _mark_failed(client, logged.model_id)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return f"models:/{logged.model_id}"


def _mark_failed(client: MlflowClient, model_id: str) -> None:
    """Best effort: the server may be why logging failed."""
    try:
        client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
    except Exception:
        pass


def requirements() -> list[str]:
    """The logged model's pip requirements: this torch, and this package where it is installed as a
    distribution (a Ray job may run it from its working_dir only: then the pin is left out)."""
    pins = [f"torch=={torch.__version__.split('+')[0]}"]
    try:
        pins.append(f"{DISTRIBUTION}=={version(DISTRIBUTION)}")
    except PackageNotFoundError:
        pass
    return pins
