"""Loading reference checkpoints: unwrapping, key filtering, position-embedding resampling and
head replacement.

Published files wrap the weights (`{"model": ...}`, `{"state_dict": ...}`), sometimes with the
`module.` prefix DistributedDataParallel adds. The weights must then fit the model exactly: every
key and shape, except a classifier head for another number of classes, which is replaced by a
freshly initialised one and reported.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")


@dataclass
class LoadReport:
    """What `load_pretrained` did: the keys loaded and whether the head was replaced."""

    loaded_keys: int
    head_replaced: bool = False
    checkpoint_classes: int | None = None
    resampled: list[str] = field(default_factory=list)


def unwrap_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, whatever wrapper and `module.` prefix it carries."""
    for key in WRAPPER_KEYS:
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def resample_pos_embed(pos_embed: torch.Tensor, num_tokens: int, prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubically resize a (1, prefix + S*S, D) position embedding to `num_tokens` tokens."""
    prefix, grid = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    old_side, new_side = math.isqrt(grid.shape[1]), math.isqrt(num_tokens - prefix_tokens)
    grid = grid.reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, -1).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a reference checkpoint onto `model`: unwrap it and resample position embeddings that
    were trained at another image size."""
    state_dict = unwrap_state_dict(state_dict)
    target = model.state_dict()
    for key, value in state_dict.items():
        if key.endswith("pos_embed") and key in target and value.shape != target[key].shape:
            state_dict[key] = resample_pos_embed(value, target[key].shape[1])
    return state_dict


def load_pretrained(model: nn.Module, path_or_state_dict: str | os.PathLike | dict,
                    weights_only: bool = True) -> LoadReport:
    """Load reference weights into `model` strictly; replace the head if the class count differs.

    `weights_only=False` unpickles arbitrary objects stored beside the weights: only for files
    you trust.
    """
    checkpoint = path_or_state_dict
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(path_or_state_dict, map_location="cpu", weights_only=weights_only)
    state_dict = checkpoint_filter_fn(checkpoint, model)
    resampled = [k for k, v in unwrap_state_dict(checkpoint).items() if k.endswith("pos_embed")
                 and k in state_dict and v.shape != state_dict[k].shape]
    report = LoadReport(loaded_keys=len(state_dict), resampled=resampled)
    head = state_dict.get("head.weight")
    num_classes = getattr(model, "num_classes", None)
    if head is not None and num_classes is not None and head.shape[0] != num_classes:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        report = LoadReport(len(state_dict), head_replaced=True, checkpoint_classes=head.shape[0], resampled=resampled)
        log.warning("checkpoint head has %d classes, model has %d: head replaced by a new one",
                    head.shape[0], num_classes)
        model.reset_classifier(num_classes)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        not_head = [k for k in missing if not k.startswith("head.")]
        if not_head or unexpected:
            raise RuntimeError(f"checkpoint does not fit the model: missing {not_head}, unexpected {unexpected}")
    else:
        model.load_state_dict(state_dict, strict=True)
    return report
