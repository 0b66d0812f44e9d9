"""Optimisation: parameter groups, the schedule, accumulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vitae
from pipelines.training.optim import build_scheduler, param_groups
from pipelines.training.config import ScheduleSettings
from pipelines.training.worker import accumulation_group

REPO = Path(__file__).resolve().parents[3]


def test_weight_decay_skips_norms_biases_and_no_weight_decay():
    with torch.device("meta"):
        model = vitae.create_model("vitae_b", num_classes=10, img_size=32, depth=1)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): name for name, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"layers.0.RC.cls_token", "layers.0.RC.pos_embed"} <= exempt
    assert all(p.ndim <= 1 or names[id(p)] in model.no_weight_decay() for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"]) and "head.weight" not in exempt
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_schedule_warms_up_linearly_then_follows_the_cosine():
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    schedule = ScheduleSettings(epochs=10, warmup_epochs=2, warmup_start_factor=0.1, min_lr_ratio=0.01)
    scheduler = build_scheduler(optimizer, schedule, lambda step: step / 5)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(50):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.55)  # linear: 0.1 -> 1 over 10 steps
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[30] == pytest.approx(0.01 + 0.99 * 0.5)  # halfway through the 40 cosine steps
    assert lrs[50] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_the_schedule_follows_epochs_and_the_groups_share_of_the_global_batch():
    """Half the workers: twice the steps per epoch, the same lr at the same epoch, times 1/2."""
    schedule = ScheduleSettings(epochs=4, warmup_epochs=1, warmup_start_factor=0.1, min_lr_ratio=0.01)
    lrs = {}
    for workers, steps_per_epoch in ((2, 5), (1, 10)):
        optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        scheduler = build_scheduler(optimizer, schedule, lambda step, n=steps_per_epoch: step / n,
                                    lambda w=workers: w / 2)
        lrs[workers] = [optimizer.param_groups[0]["lr"]]
        for _ in range(4 * steps_per_epoch):
            optimizer.step()
            scheduler.step()
            lrs[workers].append(optimizer.param_groups[0]["lr"])
    assert lrs[1][::2] == pytest.approx([lr / 2 for lr in lrs[2]])
    assert lrs[2][5] == pytest.approx(1.0) and lrs[1][-1] == pytest.approx(0.01 / 2)


@pytest.mark.parametrize("steps, accumulation, groups", [
    (7, 3, [3, 3, 1]), (6, 2, [2, 2, 2]), (4, 1, [1, 1, 1, 1]), (2, 4, [2]),
])
def test_accumulation_groups_cover_the_epoch(steps, accumulation, groups):
    plan = [accumulation_group(index, steps, accumulation) for index in range(steps)]
    ends = [index for index, (_, ends_group) in enumerate(plan) if ends_group]
    assert [size for size, ends_group in plan if ends_group] == groups  # one optimizer step per group
    assert ends[-1] == steps - 1
    assert all(size == groups[sum(1 for end in ends if end < index)] for index, (size, _) in enumerate(plan))

