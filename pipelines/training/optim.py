"""Optimisation pieces: which parameters train (`freeze`), AdamW's parameter groups (no weight decay
on 1-D parameters and `no_weight_decay()` names; per-cell learning-rate scales with layer decay),
the warmup + cosine schedule in epochs (stepped per optimizer step), and the EMA of the weights
(docs/design/training.md).
"""

from __future__ import annotations

import fnmatch
import math
from typing import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipelines.training.config import HEAD_PREFIX, OptimSettings, ScheduleSettings


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Stop the gradients of the parameters whose names match a pattern (the head's excepted);
    returns their names."""
    frozen = [name for name, parameter in model.named_parameters()
              if not name.startswith(HEAD_PREFIX) and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    parameters = dict(model.named_parameters())
    for name in frozen:
        parameters[name].requires_grad_(False)
    return frozen


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """Groups of trainable parameters by (depth, weight decay or not), shallowest first, each with its
    `lr_scale`: `layer_decay ** (head's depth - depth)` (`model.layer_ids()`), 1.0 without layer decay.
    Frozen parameters are in none (so the optimizer keeps no state for them)."""
    exempt_names = model.no_weight_decay()
    depths, top = model.layer_ids() if layer_decay is not None else ({}, 0)
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim <= 1 or name.endswith(".bias") or name in exempt_names
        depth = depths.get(name, top)
        group = groups.setdefault((depth, exempt), {
            "params": [], "weight_decay": 0.0 if exempt else weight_decay,
            "lr_scale": layer_decay ** (top - depth) if layer_decay is not None else 1.0})
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(model: nn.Module, config: OptimSettings, peak_lr: float) -> torch.optim.AdamW:
    groups = [{**group, "lr": peak_lr * group["lr_scale"]}
              for group in param_groups(model, config.weight_decay, config.layer_decay)]
    return torch.optim.AdamW(groups, lr=peak_lr, betas=config.betas, eps=config.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleSettings,
                    position: Callable[[int], float], lr_scale: Callable[[], float] = lambda: 1.0) -> LambdaLR:
    """Stepped once per optimizer step. `position(step)` is the run's progress in epochs after
    optimizer step `step` (a fraction within an epoch), so the schedule keeps its shape in epochs
    whatever the number of workers; `lr_scale()` multiplies every group's peak (the global batch's
    share of the nominal one). One factor scales every group's own peak, so layer-decay scales hold."""
    cosine_epochs = max(config.epochs - config.warmup_epochs, 1e-9)

    def factor(step: int) -> float:
        epochs = position(step)
        if epochs < config.warmup_epochs:
            shape = config.warmup_start_factor + (1 - config.warmup_start_factor) * epochs / config.warmup_epochs
        else:
            progress = min(epochs - config.warmup_epochs, cosine_epochs) / cosine_epochs
            shape = config.min_lr_ratio + (1 - config.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2
        return shape * lr_scale()

    return LambdaLR(optimizer, factor)


def refresh_lr(scheduler: LambdaLR) -> None:
    """Set every group's learning rate to the schedule's value now (after a restore, whose lr was
    computed for the worker count and position of then)."""
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)


def peak_group_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate now of the groups at full scale (the head's, with layer decay)."""
    return max(group["lr"] for group in optimizer.param_groups)


def build_ema(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An EMA copy of the parameters (buffers are copied from the model before each use)."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))


def copy_buffers(source: nn.Module, target: nn.Module) -> None:
    """Give `target` the buffers (e.g. BatchNorm statistics) of `source`, a module of the same shape."""
    with torch.no_grad():
        for mine, theirs in zip(target.buffers(), source.buffers(), strict=True):
            mine.copy_(theirs)
