"""MLflow, owned here and used by rank 0 only: one MLflow run per training run.

The run is found again rather than duplicated: a resumed training run carries its MLflow run id
in the checkpoint; a run restarted before its first checkpoint finds the run it had created by
the tag `vitae.run_name` (one with no completed epoch). A new run gets the full resolved config as
flat params (plus derived values such as the scaled learning rate) and `config.yaml`. Every epoch
logs its metrics (step = epoch) and redraws `learning_curves.png` and `confusion_matrix.png`; the
end logs the packaged model (see `model_packaging`) once and tags the run with its URI.

Nothing secret is logged: the config holds no credentials (they come from the environment; the
config refuses a tracking URI with `user:password@`).
"""

from __future__ import annotations

import re
import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pipelines import plots
from pipelines.model_packaging import ClassifierInfo, log_classifier

RUN_NAME_TAG = "vitae.run_name"
MODEL_URI_TAG = "vitae.model_uri"
PARAMS_PER_REQUEST = 100  # MLflow's log_batch limit
_USERINFO = re.compile(r"(?<=://)[^/@]+@")


class RunTracker:
    def __init__(self, client, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    @classmethod
    def attach(cls, run_name: str, experiment: str, tracking_uri: str | None, run_id: str | None,
               params: Mapping[str, Any], config_yaml: str) -> RunTracker:
        """The MLflow run of training run `run_name`: `run_id` if known, else an unstarted one, else new."""
        import mlflow
        from mlflow import MlflowClient

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        client = MlflowClient()
        experiment_id = _experiment_id(client, experiment)
        run_id = run_id or _unstarted_run(client, experiment_id, run_name)
        if run_id is None:
            run_id = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name}).info.run_id
        tracker = cls(client, run_id, experiment_id)
        if not client.get_run(run_id).data.params:
            tracker._log_config(params, config_yaml)
        client.update_run(run_id, status="RUNNING")
        return tracker

    def _log_config(self, params: Mapping[str, Any], config_yaml: str) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), PARAMS_PER_REQUEST):
            self.client.log_batch(self.run_id, params=items[start:start + PARAMS_PER_REQUEST])
        self.client.log_text(self.run_id, config_yaml, "config.yaml")

    def log_epoch(self, epoch: int, metrics: Mapping[str, float], history: Sequence[dict[str, float]],
                  confusion: torch.Tensor, class_names: Sequence[str]) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), timestamp, epoch)
                                                    for key, value in metrics.items()])
        self.client.log_figure(self.run_id, plots.learning_curves(history), "learning_curves.png")
        self.client.log_figure(self.run_id, plots.confusion_matrix(confusion, class_names), "confusion_matrix.png")

    @property
    def model_uri(self) -> str | None:
        return self.client.get_run(self.run_id).data.tags.get(MODEL_URI_TAG)

    def log_model(self, model: nn.Module, info: ClassifierInfo, source: str) -> str:
        """Log the final model (once per run); `source` says which weights (e.g. "ema")."""
        uri = log_classifier(model, info, self.run_id)
        self.client.set_tag(self.run_id, MODEL_URI_TAG, uri)
        self.client.set_tag(self.run_id, "vitae.model_weights", source)
        return uri

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def run_url(self) -> str:
        """The run's page (the tracking URI of the environment may carry credentials: dropped)."""
        import mlflow

        base = _USERINFO.sub("", mlflow.get_tracking_uri()).rstrip("/")
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def _experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another run
        return client.get_experiment_by_name(name).experiment_id


def _unstarted_run(client, experiment_id: str, run_name: str) -> str | None:
    """A run this training run created before failing ahead of its first checkpoint."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                              order_by=["attributes.start_time DESC"])
    return next((run.info.run_id for run in runs if "epoch" not in run.data.metrics), None)
