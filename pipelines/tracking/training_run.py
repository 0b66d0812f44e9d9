"""The MLflow run of one training run (rank 0 only), owned here: found again rather than duplicated,
its epochs' metrics (step = epoch) and figures, held back while MLflow does not answer and sent
once it does, and its end. How it behaves through an outage: docs/design/tracking.md."""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import torch
from mlflow.entities import Metric

from pipelines.tracking import plots
from pipelines.tracking.client import TrackingServer
from pipelines.tracking.model_logging import ModelLog
from pipelines.tracking.runs import PARENT_RUN_TAG, RUN_NAME_TAG, TrackedRun, attempt, logger, runs_tagged

METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
LEARNING_CURVES, CONFUSION_MATRIX = "learning_curves.png", "confusion_matrix.png"
HELD_BACK = "held back; training goes on", "waits for the next epoch"  # what follows an epoch MLflow missed


class TrainingRun(TrackedRun):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held_back: list[Metric] = []  # epoch metrics MLflow has not accepted yet
        self.unreachable = False  # the last attempt to send them failed
        self.figures_due: dict[str, Callable[[], Any]] = {}  # artifact -> its latest drawing, not logged yet
        self.logged_before_restart: set[int] = set()  # epochs MLflow has that the restored checkpoint lacks

    @classmethod
    def attach(cls, run_name: str, experiment: str, tracking_uri: str | None, run_id: str | None,
               params: Mapping[str, Any], config_yaml: str, parent_run_id: str | None = None,
               history: Sequence[Mapping[str, float]] = ()) -> TrainingRun:
        """The MLflow run of training run `run_name`: `run_id` if known, else an unstarted one, else
        new (nested under `parent_run_id`, a sweep's run, if given). `history` holds the metrics of
        the epochs already trained (a restored checkpoint's): those the run lacks are sent now, and
        those it has beyond them are not logged again."""
        server = TrackingServer.at(tracking_uri)
        tags = {RUN_NAME_TAG: run_name, **({PARENT_RUN_TAG: parent_run_id} if parent_run_id else {})}
        run = cls.open(server, experiment, run_id, run_name, tags, params, config_yaml, find=_unstarted_run)
        if history or run_id:  # restored from a checkpoint
            run._hold_back_missing(history)
            if run.held_back:
                run.figures_due[LEARNING_CURVES] = partial(plots.learning_curves, list(history))
            run._deliver(*HELD_BACK)
        return run

    @property
    def model(self) -> ModelLog:
        """The model this run logs (once)."""
        return ModelLog(self.server, self.client, self.run_id)

    def log_epoch(self, epoch: int, metrics: Mapping[str, float], history: Sequence[dict[str, float]],
                  confusion: torch.Tensor, class_names: Sequence[str]) -> None:
        """The epoch's metrics (step = epoch) and figures; held back while MLflow is unreachable. An epoch
        MLflow already has (logged before a restart, trained again from an earlier checkpoint) is not
        sent twice."""
        if epoch in self.logged_before_restart:
            logger.info(f"MLflow run {self.run_id} has epoch {epoch} from before the restart: not logged again")
        else:
            self._hold_back(epoch, metrics, int(time.time() * 1000))
        self.figures_due.update({LEARNING_CURVES: partial(plots.learning_curves, list(history)),
                                 CONFUSION_MATRIX: partial(plots.confusion_matrix, confusion, class_names)})
        self._deliver(*HELD_BACK)

    def finish(self, status: str = "FINISHED") -> None:
        """Send what is held back, then the figures due, and end the run with `status`; with MLflow
        unreachable, warn instead (the checkpoint keeps the epochs' metrics: running the run again
        sends them)."""
        self._deliver(f"missing from MLflow run {self.run_id}: running the training run again sends them",
                      f"of the last epoch is missing from MLflow run {self.run_id}")
        self.end(status)

    def _deliver(self, metrics_if_unreachable: str, figures_if_unreachable: str) -> None:
        """Send the held-back metrics, then, once they are in, the figures due (drawn from them)."""
        if self._send_held_back(metrics_if_unreachable):
            self._log_figures_due(figures_if_unreachable)

    def _log_figures_due(self, if_unreachable: str) -> None:
        for name, draw in list(self.figures_due.items()):
            if not attempt(partial(self.log_figure, draw(), name), f"{name} {if_unreachable}"):
                return
            del self.figures_due[name]

    def _send_held_back(self, if_unreachable: str) -> bool:
        """Send the held-back metrics; False, with a warning ending in `if_unreachable`, if MLflow
        does not answer."""
        if not self.held_back:
            return True
        epochs = _epochs(self.held_back)
        if not attempt(self._send_batches, f"the metrics of epoch(s) {epochs} are {if_unreachable}"):
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
        self.held_back += [Metric(key, float(value), timestamp, epoch) for key, value in metrics.items()]

    def _hold_back_missing(self, history: Sequence[Mapping[str, float]]) -> None:
        """Hold back the epochs of `history` that the run lacks (logged at the current time: when they
        were measured is not in the checkpoint); note those it has beyond `history`."""
        logged = {metric.step for metric in self.client.get_metric_history(self.run_id, "epoch")}
        self.logged_before_restart = logged - {int(record["epoch"]) for record in history}
        missing = [record for record in history if int(record["epoch"]) not in logged]
        timestamp = int(time.time() * 1000)
        for record in missing:
            self._hold_back(int(record["epoch"]), record, timestamp)
        if missing:
            logger.warning(f"MLflow run {self.run_id} lacks epoch(s) {_epochs(self.held_back)} (held back when the "
                           "workers stopped): sending them from the checkpoint")


def _epochs(metrics: Sequence[Metric]) -> str:
    return ", ".join(str(step) for step in sorted({metric.step for metric in metrics}))


def _unstarted_run(client, experiment_id: str, run_name: str) -> str | None:
    """A run this training run created before failing ahead of its first checkpoint."""
    runs = runs_tagged(client, experiment_id, RUN_NAME_TAG, run_name)
    return next((run.info.run_id for run in runs if "epoch" not in run.data.metrics), None)
