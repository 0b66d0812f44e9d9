"""Parameter and FLOP counts of a model, measured on the meta device (no memory, no compute)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .factory import create_model


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_stats(name: str, img_size: int = 224, **kwargs) -> dict[str, float]:
    """Parameters (all / trainable) and GMACs of one forward pass of a single image.

    GMACs are what papers, the ViTAE ones included, quote as "GFLOPs" (one multiply-add each).
    """
    with torch.device("meta"):
        model = create_model(name, img_size=img_size, **kwargs).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.empty(1, model.pretrained_cfg["input_size"][0], img_size, img_size))
    return {"params": count_params(model), "trainable_params": count_params(model, trainable_only=True),
            "gmacs": counter.get_total_flops() / 2e9}
