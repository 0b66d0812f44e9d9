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


def model_table(names: list[str], img_size: int = 224) -> list[str]:
    """A text table of `names` with parameters, trainable parameters and GFLOPs (GMACs) at `img_size`."""
    lines = [f"{'model':<14}{'params':>14}{'trainable':>14}{'GFLOPs':>9}   (at {img_size}px, 1000 classes)"]
    for name in names:
        try:
            stats = model_stats(name, img_size=img_size)
        except ValueError as error:
            lines.append(f"{name:<14}{'-':>14}{'-':>14}{'-':>9}   {error}")
            continue
        lines.append(f"{name:<14}{stats['params']:>14,}{stats['trainable_params']:>14,}{stats['gmacs']:>9.2f}")
    lines.append("GFLOPs count one multiply-add as one operation, as the ViTAE papers do.")
    return lines
