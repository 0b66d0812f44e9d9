"""Evaluation: sums (loss, top-1 and top-5 hits, samples, confusion matrix) over this rank's part of
a split, summed across ranks with one all-reduce (docs/design/training.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


@dataclass
class EvalTotals:
    loss_sum: float
    top1: int
    top5: int
    count: int
    confusion: torch.Tensor  # (true class, predicted class) counts

    @classmethod
    def zeros(cls, num_classes: int) -> EvalTotals:
        return cls(0.0, 0, 0, 0, torch.zeros(num_classes, num_classes, dtype=torch.int64))

    def add_batch(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.float().cpu(), labels.cpu()
        self.loss_sum += F.cross_entropy(logits.double(), labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.top1 += (top[:, 0] == labels).sum().item()
        self.top5 += (top == labels[:, None]).any(dim=1).sum().item()
        self.count += labels.numel()
        num_classes = self.confusion.shape[0]
        self.confusion += torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes**2).view_as(self.confusion)

    def all_reduced(self, device: torch.device) -> EvalTotals:
        """The sums over every rank (itself when not distributed)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        packed = torch.cat([torch.tensor([self.loss_sum, self.top1, self.top5, self.count], dtype=torch.float64),
                            self.confusion.flatten().double()]).to(device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        packed = packed.cpu()
        return EvalTotals(packed[0].item(), int(packed[1]), int(packed[2]), int(packed[3]),
                          packed[4:].round().long().view_as(self.confusion))

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Mean loss, top-1 and top-5 accuracy, keyed `{prefix}_loss` etc. (`loss` etc. without one)."""
        count, start = max(self.count, 1), f"{prefix}_" if prefix else ""
        return {f"{start}loss": self.loss_sum / count, f"{start}top1": self.top1 / count,
                f"{start}top5": self.top5 / count}


@torch.no_grad()
def evaluate(models: Mapping[str, nn.Module], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             to_model_input: Callable[[torch.Tensor], torch.Tensor], num_classes: int,
             device: torch.device) -> dict[str, EvalTotals]:
    """This rank's sums for each model, in one pass over `batches`; `to_model_input` turns a uint8 batch
    on the device into model input."""
    modes = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    totals = {name: EvalTotals.zeros(num_classes) for name in models}
    for images, labels in batches:
        inputs = to_model_input(images.to(device, non_blocking=True))
        for name, model in models.items():
            totals[name].add_batch(model(inputs), labels)
    for name, model in models.items():
        model.train(modes[name])
    return totals


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart after DDP's last step)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
