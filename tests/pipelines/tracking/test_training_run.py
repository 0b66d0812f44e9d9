"""The training figures after an MLflow outage, on a real `mlflow server` of the test's own.

Rank 0's `TrainingRun` logs epoch 1 with MLflow up; the server is stopped over the last epoch, so
its metrics are held back; it is started again on the same port and the run finishes. The figures
in MLflow must then be those of the full history: the learning curves of both epochs and the last
epoch's confusion matrix (compared byte for byte with the same figures drawn here). A run that
attaches again with an epoch MLflow lacks (a restart after the outage) redraws the curves too.
"""

from __future__ import annotations

import io
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from pipelines.tracking import plots
from pipelines.tracking.training_run import CONFUSION_MATRIX, LEARNING_CURVES, TrainingRun
from tests.support.train_helpers import OwnMlflowServer

pytestmark = [pytest.mark.timeout(300), pytest.mark.services]  # an MLflow server of its own

CLASSES = ["a", "b", "c"]


def epoch_metrics(epoch: int) -> dict[str, float]:
    return {"epoch": epoch, "train_loss": 2.0 / epoch, "val_loss": 2.5 / epoch, "val_top1": 0.3 * epoch,
            "val_top5": 1.0}


def confusion(epoch: int) -> torch.Tensor:
    return torch.eye(len(CLASSES), dtype=torch.long) * (10 * epoch) + 1


def png(figure) -> bytes:
    """The bytes `MlflowClient.log_figure` stores for `figure` (it calls `savefig` on a .png path)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def logged(client: MlflowClient, run_id: str, name: str, directory: Path) -> bytes:
    return Path(client.download_artifacts(run_id, name, str(directory))).read_bytes()


@pytest.fixture
def tracking_server(tmp_path):
    server = OwnMlflowServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_figures_are_redrawn_from_the_full_history_once_held_back_metrics_are_delivered(tracking_server, tmp_path):
    tracker = TrainingRun.attach("figures-outage", "vitae-b2-figures", tracking_server.server.uri, None,
                                 {"probe": 1}, "probe: 1\n")
    assert mlflow.get_tracking_uri() != tracking_server.server.uri, "attaching changed this process's tracking URI"
    history = [epoch_metrics(1)]
    tracker.log_epoch(1, history[-1], history, confusion(1), CLASSES)
    tracking_server.stop()
    history.append(epoch_metrics(2))
    tracker.log_epoch(2, history[-1], history, confusion(2), CLASSES)  # the last epoch, during the outage
    assert {metric.step for metric in tracker.held_back} == {2}
    tracking_server.start()
    tracker.finish()

    client = MlflowClient(tracking_server.server.uri)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert [metric.step for metric in client.get_metric_history(tracker.run_id, "val_top1")] == [1, 2]
    curves = logged(client, tracker.run_id, LEARNING_CURVES, tmp_path / "finished")
    assert curves != png(plots.learning_curves(history[:1])), "the learning curves still show epoch 1 only"
    assert curves == png(plots.learning_curves(history))
    assert logged(client, tracker.run_id, CONFUSION_MATRIX, tmp_path / "finished") == png(
        plots.confusion_matrix(confusion(2), CLASSES)), "the confusion matrix is not the last epoch's"

    history.append(epoch_metrics(3))  # trained by workers that stopped before MLflow had it
    again = TrainingRun.attach("figures-outage", "vitae-b2-figures", tracking_server.server.uri, tracker.run_id,
                               {"probe": 1}, "probe: 1\n", history=history)
    assert again.run_id == tracker.run_id and not again.held_back
    assert logged(client, tracker.run_id, LEARNING_CURVES, tmp_path / "attached") == png(
        plots.learning_curves(history))


def test_an_epoch_trained_again_after_a_restart_is_logged_once(tracking_server):
    """Rank 0 logged epoch 2, then its worker died before epoch 2's checkpoint was stored (uploads
    run in the background): the restarted group restores epoch 1's checkpoint and trains epoch 2
    again. MLflow keeps one entry per epoch; epoch 3 goes on as usual."""
    uri = tracking_server.server.uri
    tracker = TrainingRun.attach("restarted", "vitae-restarts", uri, None, {"probe": 1}, "probe: 1\n")
    history = [epoch_metrics(1), epoch_metrics(2)]
    for epoch in (1, 2):
        tracker.log_epoch(epoch, history[epoch - 1], history[:epoch], confusion(epoch), CLASSES)
    again = TrainingRun.attach("restarted", "vitae-restarts", uri, tracker.run_id, {"probe": 1}, "probe: 1\n",
                               history=history[:1])
    assert again.logged_before_restart == {2}
    again.log_epoch(2, epoch_metrics(2), history, confusion(2), CLASSES)
    history.append(epoch_metrics(3))
    again.log_epoch(3, history[-1], history, confusion(3), CLASSES)
    again.finish()
    client = MlflowClient(uri)
    for key in ("epoch", "val_top1"):
        assert [metric.step for metric in client.get_metric_history(tracker.run_id, key)] == [1, 2, 3], key
