"""Optimisation pieces: AdamW over two parameter groups (no weight decay on 1-D parameters and
`no_weight_decay()` names), the warmup + cosine schedule per optimizer step, and the EMA of the
weights (docs/design/training.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pipelines.training.config import OptimSettings, ScheduleSettings


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[decayed parameters, parameters exempt from weight decay]."""
    exempt_names = model.no_weight_decay()
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim <= 1 or name.endswith(".bias") or name in exempt_names
        (no_decay if exempt else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: OptimSettings, peak_lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=peak_lr, betas=config.betas,
                             eps=config.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleSettings, steps_per_epoch: int) -> LRScheduler:
    """Stepped once per optimizer step; `steps_per_epoch` counts optimizer steps."""
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    peak_lr = optimizer.param_groups[0]["lr"]
    cosine = CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup_steps, 1), eta_min=config.min_lr_ratio * peak_lr)
    if warmup_steps == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=config.warmup_start_factor, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


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
