"""Checkpoint state, the packaged classifier, figures."""

from __future__ import annotations

import io
import random
from pathlib import Path

import torch

import vitae
from pipelines.tracking import plots
from pipelines.training.augment import normalize
from pipelines.training.train_state import Checkpointer, RngState, TrainProgress
from pipelines.training.worker import EpochStats
from pipelines.model_packaging import ClassifierInfo, package
from pipelines.training.optim import build_scheduler
from pipelines.training.config import ScheduleSettings

REPO = Path(__file__).resolve().parents[3]


def test_checkpointer_restores_every_state(tmp_path):
    def parts():
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = build_scheduler(optimizer, ScheduleSettings(epochs=4, warmup_epochs=1), lambda step: step / 2)
        progress, private = TrainProgress(), random.Random(5)
        states = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "progress": progress}
        return states, private, Checkpointer(states, {"rng": RngState(private)}, rank=0,
                                                   config_json='{"name": "x"}')

    saved, private, checkpointer = parts()
    saved["model"](torch.randn(5, 3)).sum().backward()
    saved["optimizer"].step()
    saved["scheduler"].step()
    saved["progress"].complete_epoch({"epoch": 1, "val_top1": 0.5})
    saved["progress"].mlflow_run_id = "run-1"
    checkpointer.save(tmp_path)
    expected_draws = (random.random(), torch.rand(2), private.random())

    restored, restored_private, other = parts()
    other.load(tmp_path)
    assert (random.random(), restored_private.random()) == (expected_draws[0], expected_draws[2])
    assert torch.equal(torch.rand(2), expected_draws[1])
    for key, value in saved["model"].state_dict().items():
        assert torch.equal(restored["model"].state_dict()[key], value)
    assert restored["scheduler"].state_dict() == saved["scheduler"].state_dict()
    assert restored["optimizer"].state_dict()["state"].keys() == saved["optimizer"].state_dict()["state"].keys()
    assert restored["progress"] == saved["progress"]
    assert (tmp_path / "config.json").read_text() == '{"name": "x"}'


def test_a_group_of_another_size_sums_the_epoch_statistics_on_rank_0(tmp_path):
    model = torch.nn.Linear(2, 2)

    def checkpointer(rank: int, world_size: int, stats: EpochStats) -> Checkpointer:
        return Checkpointer({"model": model}, {"epoch_stats": stats}, rank, "{}", world_size=world_size)

    for rank in range(2):  # a 2-worker group, 3 batches into the epoch
        checkpointer(rank, 2, EpochStats(loss_sum=1.5 + rank, samples=24, steps=3, elapsed_s=2.0)).save(tmp_path)
    one, other = EpochStats(), EpochStats(samples=99)
    checkpointer(0, 1, one).load(tmp_path)
    assert (one.loss_sum, one.samples, one.steps, one.elapsed_s) == (4.0, 48, 3, 4.0)
    checkpointer(1, 3, other).load(tmp_path)  # another rank of a larger group: from zero
    assert (other.samples, other.steps) == (0, 0)
    same = EpochStats()
    checkpointer(1, 2, same).load(tmp_path)  # the same size: its own
    assert (same.loss_sum, same.samples) == (2.5, 24)


def test_packaged_classifier_takes_uint8_and_normalises_inside():
    model = vitae.create_model("vitae_t", num_classes=3, img_size=16, depth=1).eval()
    info = ClassifierInfo("vitae_t", ["a", "b", "c"], 16, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 1.0, "bicubic")
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        expected = model(normalize(images, torch.tensor(info.mean), torch.tensor(info.std)))
        assert torch.allclose(package(model, info)(images), expected, atol=1e-6)
    assert info.metadata()["class_names"] == ["a", "b", "c"]


def test_figures_render_as_png():
    history = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 1.5 / e, "val_top1": 0.3 * e, "val_top5": 0.9}
               for e in (1, 2, 3)]
    for figure in (plots.learning_curves(history), plots.confusion_matrix(torch.eye(3, dtype=torch.long) * 4,
                                                                           ["a", "b", "c"])):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        assert buffer.getvalue().startswith(b"\x89PNG")
