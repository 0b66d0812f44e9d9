"""The MLflow run of one sweep, owned here: found again by its name when the sweep resumes, the
trials' training runs nested under it, and at the end its trial table, figure and counts."""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import pandas
from mlflow.entities import Metric

from pipelines.tracking.client import TrackingServer
from pipelines.tracking.runs import PARENT_RUN_TAG, RUN_NAME_TAG, SWEEP_NAME_TAG, TrackedRun, runs_tagged, terminate_run


class SweepRun(TrackedRun):
    @classmethod
    def attach(cls, sweep_name: str, experiment: str, tracking_uri: str | None, params: Mapping[str, Any],
               config_yaml: str, resume: bool) -> SweepRun:
        """The MLflow run of sweep `sweep_name`: new, or when it resumes, its latest run (if any)."""
        return cls.open(TrackingServer.at(tracking_uri), experiment, None, sweep_name, {SWEEP_NAME_TAG: sweep_name},
                        params, config_yaml, find=_latest_sweep_run if resume else None)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        timestamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), timestamp, 0)
                                                    for key, value in metrics.items()])

    def child_runs(self) -> dict[str, Any]:
        """The runs nested under this one (the trials), by training-run name."""
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
        self.client.log_text(self.run_id, pandas.DataFrame(rows).to_csv(index=False), name)

    def finish(self) -> None:
        self.end("FINISHED")


def _latest_sweep_run(client, experiment_id: str, sweep_name: str) -> str | None:
    runs = runs_tagged(client, experiment_id, SWEEP_NAME_TAG, sweep_name, max_results=1)
    return runs[0].info.run_id if runs else None
