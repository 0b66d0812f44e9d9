"""Model logging, owned here: a trained model packaged (`model_packaging.package`) and logged to its
MLflow run with the project's flavour (`pipelines.serving`), once per run, its URI recorded in the
run's `vitae.model_uri` tag."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import torch
from mlflow import MlflowClient
from mlflow.models import Model
from torch import nn

from pipelines import serving
from pipelines.model_packaging import ClassifierInfo, package
from pipelines.tracking.client import TrackingServer
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
        uri = log_classifier(model, info, self.run_id, self.server)
        self.client.set_tag(self.run_id, MODEL_URI_TAG, uri)
        self.client.set_tag(self.run_id, MODEL_WEIGHTS_TAG, source)
        return uri


def log_classifier(model: nn.Module, info: ClassifierInfo, run_id: str, server: TrackingServer | None = None) -> str:
    """Log `model` to the MLflow run `run_id` (which must exist) of `server` (default: the
    environment's); return the logged model's URI."""
    with (server or TrackingServer.at()).as_default():  # `Model.log` takes no tracking URI
        logged = Model.log(
            artifact_path=None,  # deprecated for `name`, but still a required positional parameter
            name=MODEL_NAME, flavor=serving, run_id=run_id, metadata=info.metadata(),
            pytorch_model=package(model, info), signature=serving.signature(),
            input_example=serving.input_example(info.img_size), pip_requirements=requirements(),
        )
    return logged.model_uri


def requirements() -> list[str]:
    """The logged model's pip requirements: this torch, and this package where it is installed as a
    distribution (a Ray job may run it from its working_dir only: then the pin is left out)."""
    pins = [f"torch=={torch.__version__.split('+')[0]}"]
    try:
        pins.append(f"{DISTRIBUTION}=={version(DISTRIBUTION)}")
    except PackageNotFoundError:
        pass
    return pins
