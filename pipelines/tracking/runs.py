"""MLflow, owned here: one MLflow run per training run (used by rank 0 only), and one per sweep
with the sweep's trials nested under it.

The run is found again rather than duplicated: a resumed training run carries its MLflow run id
in the checkpoint; a run restarted before its first checkpoint finds the run it had created by
the tag `vitae.run_name` (one with no completed epoch). A new run gets the full resolved config as
flat params (plus derived values such as the scaled learning rate) and `config.yaml`. Every epoch
logs its metrics (step = epoch) and redraws `learning_curves.png` and `confusion_matrix.png`; the
end logs the packaged model (see `model_packaging`) once and tags the run with its URI.

An MLflow outage neither stalls nor fails training. Epoch results are sent with a few quick
retries (MLflow's own client retries, bounded: `mlflow_access.QUICK_RETRIES`) instead of MLflow's default of
about four minutes per request; metrics that do not get through are held back (with the time they
were measured) and sent with the next epoch's or at the end. The figures follow the metrics: they
are logged once the metrics they show are in, drawn from the full history of the latest epoch
(`figures_due`), so an outage over the last epoch leaves no stale curve. Held-back metrics
survive a restart of the workers: they are in the checkpoint's per-epoch history, and a run that
attaches again sends the epochs its MLflow run lacks (and redraws the learning curves). Whatever is
still held back when the run ends is named in a warning.

A resumed sweep finds its run again by the tag `vitae.sweep_name` (the latest run of that name).
A trial's training run names it as parent (MLflow's `mlflow.parentRunId` tag, which nests
it in the UI) when it is created; the sweep's run ends with the trial table and figure.

Nothing secret is logged: the config holds no credentials (they come from the environment; the
config refuses a tracking URI with `user:password@`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from pipelines.tracking import plots
from pipelines.tracking.client import quick_retries, short, unreachable, without_credentials
from pipelines.model_packaging import ClassifierInfo, log_classifier

RUN_NAME_TAG = "vitae.run_name"
SWEEP_NAME_TAG = "vitae.sweep_name"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag (mlflow.utils.mlflow_tags)
MODEL_URI_TAG = "vitae.model_uri"
PARAMS_PER_REQUEST = 100  # MLflow's log_batch limits
METRICS_PER_REQUEST = 1000
LEARNING_CURVES, CONFUSION_MATRIX = "learning_curves.png", "confusion_matrix.png"

logger = logging.getLogger(__name__)  # rank 0's warnings reach the job's console through Ray Train


class RunTracker:
    def __init__(self, client, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.held_back: list = []  # epoch metrics (mlflow.entities.Metric) MLflow has not accepted yet
        self.unreachable = False  # the last attempt to send them failed
        self.figures_due: dict[str, Callable[[], Any]] = {}  # artifact -> its latest drawing, not logged yet

    @classmethod
    def attach(cls, run_name: str, experiment: str, tracking_uri: str | None, run_id: str | None,
               params: Mapping[str, Any], config_yaml: str, parent_run_id: str | None = None,
               history: Sequence[Mapping[str, float]] = ()) -> RunTracker:
        """The MLflow run of training run `run_name`: `run_id` if known, else an unstarted one, else
        new (nested under `parent_run_id`, a sweep's run, if given). `history` holds the metrics of
        the epochs already trained (a restored checkpoint's): those the run lacks are sent now."""
        client, experiment_id = _connect(experiment, tracking_uri)
        run_id = run_id or _unstarted_run(client, experiment_id, run_name)
        tags = {RUN_NAME_TAG: run_name, **({PARENT_RUN_TAG: parent_run_id} if parent_run_id else {})}
        tracker = cls._open(client, experiment_id, run_id, run_name, tags, params, config_yaml)
        if history:
            tracker._hold_back_missing(history)
            if tracker.held_back:
                tracker.figures_due[LEARNING_CURVES] = partial(plots.learning_curves, list(history))
            tracker._deliver("held back; training goes on", "waits for the next epoch")
        return tracker

    @classmethod
    def attach_sweep(cls, sweep_name: str, experiment: str, tracking_uri: str | None, params: Mapping[str, Any],
                     config_yaml: str, resume: bool) -> RunTracker:
        """The MLflow run of sweep `sweep_name`: new, or when it resumes, its latest run (if any)."""
        client, experiment_id = _connect(experiment, tracking_uri)
        run_id = _latest_sweep_run(client, experiment_id, sweep_name) if resume else None
        return cls._open(client, experiment_id, run_id, sweep_name, {SWEEP_NAME_TAG: sweep_name}, params, config_yaml)

    @classmethod
    def _open(cls, client, experiment_id: str, run_id: str | None, run_name: str, tags: Mapping[str, str],
              params: Mapping[str, Any], config_yaml: str) -> RunTracker:
        """Run `run_id`, or a new run; its config is logged once; it is marked running."""
        if run_id is None:
            run_id = client.create_run(experiment_id, run_name=run_name, tags=dict(tags)).info.run_id
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
        """The epoch's metrics (step = epoch) and figures; held back while MLflow is unreachable."""
        self._hold_back(epoch, metrics, int(time.time() * 1000))
        self.figures_due.update({LEARNING_CURVES: partial(plots.learning_curves, list(history)),
                                 CONFUSION_MATRIX: partial(plots.confusion_matrix, confusion, class_names)})
        self._deliver("held back; training goes on", "waits for the next epoch")

    def _deliver(self, metrics_if_unreachable: str, figures_if_unreachable: str) -> None:
        """Send the held-back metrics, then, once they are in, the figures due (drawn from them)."""
        if self._send_held_back(metrics_if_unreachable):
            self._log_figures_due(figures_if_unreachable)

    def _log_figures_due(self, if_unreachable: str) -> None:
        for name, draw in list(self.figures_due.items()):
            if not self._attempt(partial(self.log_figure, draw(), name), f"{name} {if_unreachable}"):
                return
            del self.figures_due[name]

    def _send_held_back(self, if_unreachable: str) -> bool:
        """Send the held-back metrics; False, with a warning ending in `if_unreachable`, if MLflow
        does not answer."""
        if not self.held_back:
            return True
        epochs = _epochs(self.held_back)
        if not self._attempt(self._send_batches, f"the metrics of epoch(s) {epochs} are {if_unreachable}"):
            self.unreachable = True
            return False
        if self.unreachable:
            logger.warning(f"MLflow answers again: sent the held-back metrics of epoch(s) {epochs}")
            self.unreachable = False
        return True

    def _send_batches(self) -> None:
        while self.held_back:
            batch = self.held_back[:METRICS_PER_REQUEST]
            self.client.log_batch(self.run_id, metrics=batch)
            del self.held_back[:len(batch)]

    def _hold_back(self, epoch: int, metrics: Mapping[str, float], timestamp: int) -> None:
        from mlflow.entities import Metric

        self.held_back += [Metric(key, float(value), timestamp, epoch) for key, value in metrics.items()]

    def _hold_back_missing(self, history: Sequence[Mapping[str, float]]) -> None:
        """Hold back the epochs of `history` that the run lacks (logged at the current time: when they
        were measured is not in the checkpoint)."""
        logged = {metric.step for metric in self.client.get_metric_history(self.run_id, "epoch")}
        missing = [record for record in history if int(record["epoch"]) not in logged]
        timestamp = int(time.time() * 1000)
        for record in missing:
            self._hold_back(int(record["epoch"]), record, timestamp)
        if missing:
            logger.warning(f"MLflow run {self.run_id} lacks epoch(s) {_epochs(self.held_back)} (held back when the "
                           "workers stopped): sending them from the checkpoint")

    def _attempt(self, send: Callable[[], Any], if_unreachable: str) -> bool:
        """Run `send` with quick retries; if MLflow does not answer, warn (`if_unreachable` says what
        follows) and return False. Other errors are raised."""
        try:
            with quick_retries():
                send()
        except Exception as error:
            if not unreachable(error):
                raise
            logger.warning(f"MLflow unreachable ({short(error)}): {if_unreachable}")
            return False
        return True

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
        """Send what is held back, then the figures due, and end the run with `status`; with MLflow
        unreachable, warn instead (the checkpoint keeps the epochs' metrics: running the run again
        sends them)."""
        self._deliver(f"missing from MLflow run {self.run_id}: running the training run again sends them",
                      f"of the last epoch is missing from MLflow run {self.run_id}")
        self._attempt(lambda: terminate_run(self.client, self.run_id, status), f"run {self.run_id} not marked {status}")

    @property
    def tags(self) -> dict[str, str]:
        return self.client.get_run(self.run_id).data.tags

    @property
    def params(self) -> dict[str, str]:
        return self.client.get_run(self.run_id).data.params

    def set_tags(self, tags: Mapping[str, object]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), timestamp, 0)
                                                    for key, value in metrics.items()])

    def child_runs(self) -> dict[str, Any]:
        """The runs nested under this one (a sweep's trials), by training-run name."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{self.run_id}'")
        return {run.data.tags.get(RUN_NAME_TAG, run.info.run_id): run for run in runs}

    def end_running_children(self) -> list[str]:
        """Mark KILLED the nested runs still running once the sweep is over: trials whose training
        was ended from outside (stopped early by the scheduler). Returns their names."""
        running = {name: run for name, run in self.child_runs().items() if run.info.status == "RUNNING"}
        for run in running.values():
            terminate_run(self.client, run.info.run_id, "KILLED")
        return sorted(running)

    def log_table(self, rows: Sequence[Mapping[str, Any]], name: str) -> None:
        """`rows` as a CSV artifact `name`."""
        import pandas

        self.client.log_text(self.run_id, pandas.DataFrame(rows).to_csv(index=False), name)

    def log_figure(self, figure, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def run_url(self) -> str:
        """The run's page (the tracking URI of the environment may carry credentials: dropped)."""
        import mlflow

        base = without_credentials(mlflow.get_tracking_uri()).rstrip("/")
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"


def terminate_run(client, run_id: str, status: str) -> None:
    """End a run without MLflow's "View run" line: it is built from the tracking URI, credentials included."""
    with contextlib.redirect_stdout(io.StringIO()):
        client.set_terminated(run_id, status)


def _epochs(metrics: Sequence) -> str:
    return ", ".join(str(step) for step in sorted({metric.step for metric in metrics}))


def _connect(experiment: str, tracking_uri: str | None):
    """A client of `tracking_uri` (default: the environment's) and the id of `experiment` (created if new)."""
    import mlflow
    from mlflow import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    return client, ensure_experiment(client, experiment)


def ensure_experiment(client, name: str) -> str:
    """The id of the experiment `name`, created if missing (also when another process races us)."""
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


def _latest_sweep_run(client, experiment_id: str, sweep_name: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_NAME_TAG}` = '{sweep_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None
