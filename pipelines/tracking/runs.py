"""MLflow runs, owned here: the tags that find a run again, a run opened once with its resolved
config (flat params and `config.yaml`), and what every run does: tags, figures, its page, its end.
`TrainingRun` (training_run.py) and `SweepRun` (sweep_run.py) build on `TrackedRun`."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any, Callable, Mapping

from mlflow import MlflowClient
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException

from pipelines.tracking.client import TrackingServer, patiently, short, unreachable

RUN_NAME_TAG = "vitae.run_name"
SWEEP_NAME_TAG = "vitae.sweep_name"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag (mlflow.utils.mlflow_tags)
MODEL_URI_TAG = "vitae.model_uri"
PARAMS_PER_REQUEST = 100  # MLflow's log_batch limit

FindRun = Callable[[MlflowClient, str, str], "str | None"]  # (client, experiment id, run name) -> run id

logger = logging.getLogger(__name__)  # rank 0's warnings reach the job's console through Ray Train


class TrackedRun:
    """One MLflow run of `server`, through `client`."""

    def __init__(self, server: TrackingServer, client: MlflowClient, run_id: str, experiment_id: str):
        self.server, self.client, self.run_id, self.experiment_id = server, client, run_id, experiment_id

    @classmethod
    def open(cls, server: TrackingServer, experiment: str, run_id: str | None, run_name: str,
             tags: Mapping[str, str], params: Mapping[str, Any], config_yaml: str, find: FindRun | None = None):
        """Run `run_id` of `experiment` (created if new), else the one `find` finds, else a new run; its
        config is logged once; it is marked running. A server that does not answer is waited for
        (`patiently`): it may be starting."""
        return patiently(lambda: cls._open(server, experiment, run_id, run_name, tags, params, config_yaml, find),
                         f"opening MLflow run {run_name}", server)

    @classmethod
    def _open(cls, server: TrackingServer, experiment: str, run_id: str | None, run_name: str,
              tags: Mapping[str, str], params: Mapping[str, Any], config_yaml: str, find: FindRun | None):
        client = server.client()
        experiment_id = ensure_experiment(client, experiment)
        run_id = run_id or (find(client, experiment_id, run_name) if find else None)
        if run_id is None:
            run_id = client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id
        run = cls(server, client, run_id, experiment_id)
        if not client.get_run(run_id).data.params:
            run._log_config(params, config_yaml)
        client.update_run(run_id, status="RUNNING")
        return run

    def _log_config(self, params: Mapping[str, Any], config_yaml: str) -> None:
        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), PARAMS_PER_REQUEST):
            self.client.log_batch(self.run_id, params=items[start:start + PARAMS_PER_REQUEST])
        self.client.log_text(self.run_id, config_yaml, "config.yaml")

    @property
    def tags(self) -> dict[str, str]:
        return self.client.get_run(self.run_id).data.tags

    @property
    def params(self) -> dict[str, str]:
        return self.client.get_run(self.run_id).data.params

    def set_tags(self, tags: Mapping[str, object]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_figure(self, figure, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def run_url(self) -> str:
        """The run's page (without the credentials a tracking URI may carry)."""
        return f"{self.server.shown.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def end(self, status: str) -> None:
        """Mark the run `status`; with MLflow unreachable, warn instead."""
        attempt(lambda: terminate_run(self.client, self.run_id, status), f"run {self.run_id} not marked {status}")


def attempt(send: Callable[[], Any], if_unreachable: str) -> bool:
    """Run `send` (quick retries); if MLflow does not answer, warn (`if_unreachable` says what follows)
    and return False. Other errors are raised."""
    try:
        send()
    except Exception as error:
        if not unreachable(error):
            raise
        logger.warning(f"MLflow unreachable ({short(error)}): {if_unreachable}")
        return False
    return True


def terminate_run(client: MlflowClient, run_id: str, status: str) -> None:
    """End a run without MLflow's "View run" line: it is built from the tracking URI, credentials included."""
    with contextlib.redirect_stdout(io.StringIO()):
        client.set_terminated(run_id, status)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of the experiment `name`, created if missing (also when another process races us)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another run
        return client.get_experiment_by_name(name).experiment_id


def runs_tagged(client: MlflowClient, experiment_id: str, tag: str, value: str, **search) -> list:
    """The runs of `experiment_id` tagged `tag` = `value`, newest first."""
    return client.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
                              order_by=["attributes.start_time DESC"], **search)
