"""Batch-level mixup (Zhang et al., 2018) and cutmix (Yun et al., 2019) on the device, returning
class-probability targets (docs/design/training.md).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class Mixing:
    num_classes: int
    mixup_alpha: float
    cutmix_alpha: float
    mix_prob: float
    switch_prob: float

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, class indices) -> (maybe mixed images, class-probability targets)."""
        targets = F.one_hot(labels, self.num_classes).float()
        if not self.enabled or rng.random() >= self.mix_prob:
            return images, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = rng.betavariate(alpha, alpha)
        if use_cutmix:
            images, lam = cutmix(images, lam, rng)
        else:
            images = images * lam + images.flip(0) * (1.0 - lam)
        return images, targets * lam + targets.flip(0) * (1.0 - lam)


def cutmix(images: torch.Tensor, lam: float, rng: random.Random) -> tuple[torch.Tensor, float]:
    """Paste a box of about `1 - lam` of the area from the reversed batch; return the true lambda."""
    height, width = images.shape[-2:]
    cut = math.sqrt(1.0 - lam)
    box_h, box_w = round(height * cut), round(width * cut)
    cy, cx = rng.randrange(height), rng.randrange(width)
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)
