"""Loading reference checkpoints: reading, unwrapping, key filtering, position-embedding resampling,
head replacement, and the reference layout written back (`reference_checkpoint`).

Published files wrap the weights (`{"model": ...}`, `{"state_dict": ...}`), sometimes with the
`module.` prefix DistributedDataParallel adds. The weights must then fit the model exactly: every
key and shape, except a classifier head for another number of classes, which is replaced by a
freshly initialised one and reported. A key that does not fit is an `IncompatibleCheckpoint` naming it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass, field
from typing import IO

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
HEAD_KEYS = ("head.weight", "head.bias")
# What reference checkpoints carry beside the tensors (timm's checkpoint saver stores its argparse
# arguments): allowed through `torch.load(weights_only=True)`, which refuses any other object.
SAFE_GLOBALS = [argparse.Namespace]


class IncompatibleCheckpoint(ValueError):
    """A checkpoint whose tensors do not fit the model; the message names the first key that does not."""


@dataclass
class LoadReport:
    """What `load_pretrained` did: the keys loaded, the head replaced (its keys in `replaced`) and
    the position embeddings resampled to the model's image size."""

    loaded_keys: int
    head_replaced: bool = False
    checkpoint_classes: int | None = None
    resampled: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)


def read_checkpoint(file: str | os.PathLike | IO[bytes]) -> dict:
    """`torch.load` of a checkpoint file on the CPU, tensors and plain containers only."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(file, map_location="cpu", weights_only=True)


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


def fit_state_dict(checkpoint: dict, model: nn.Module) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The tensors of `checkpoint` that `model` takes, and what changed on the way; reads only the
    model's shapes (a model on the meta device will do). `IncompatibleCheckpoint` names the first
    missing, unexpected or misshapen key."""
    original = unwrap_state_dict(checkpoint)
    state_dict = checkpoint_filter_fn(original, model)
    target = model.state_dict()
    report = LoadReport(loaded_keys=0, resampled=[k for k, v in original.items() if k.endswith("pos_embed")
                                                  and k in target and v.shape != target[k].shape])
    head = state_dict.get("head.weight")
    num_classes = getattr(model, "num_classes", None)
    if (head is not None and num_classes is not None and "head.weight" in target and head.shape[0] != num_classes
            and head.shape[1:] == target["head.weight"].shape[1:]):
        report.head_replaced, report.checkpoint_classes = True, head.shape[0]
        report.replaced = [key for key in HEAD_KEYS if key in state_dict]
        state_dict = {k: v for k, v in state_dict.items() if k not in HEAD_KEYS}
    _check_fit(state_dict, target, skipped=HEAD_KEYS if report.head_replaced else ())
    report.loaded_keys = len(state_dict)
    return state_dict, report


def _check_fit(state_dict: dict[str, torch.Tensor], target: dict[str, torch.Tensor], skipped: tuple[str, ...]) -> None:
    missing = [k for k in target if k not in state_dict and k not in skipped]
    unexpected = [k for k in state_dict if k not in target]
    misshapen = [k for k in state_dict if k in target and state_dict[k].shape != target[k].shape]
    if misshapen:
        key = misshapen[0]
        raise IncompatibleCheckpoint(f"key {key} has shape {list(state_dict[key].shape)} in the checkpoint, "
                                     f"{list(target[key].shape)} in the model{_more(misshapen)}")
    if missing:
        raise IncompatibleCheckpoint(f"key {missing[0]} is missing from the checkpoint{_more(missing)}")
    if unexpected:
        raise IncompatibleCheckpoint(f"key {unexpected[0]} of the checkpoint is not in the model{_more(unexpected)}")


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def load_pretrained(model: nn.Module, path_or_state_dict: str | os.PathLike | dict) -> LoadReport:
    """Load reference weights into `model` strictly; replace the head if the class count differs.
    A file may hold tensors, plain containers and argparse arguments, nothing else."""
    checkpoint = path_or_state_dict
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(path_or_state_dict)
    state_dict, report = fit_state_dict(checkpoint, model)
    if report.head_replaced:
        log.warning("checkpoint head has %d classes, model has %d: head replaced by a new one",
                    report.checkpoint_classes, model.num_classes)
        model.reset_classifier(model.num_classes)
    model.load_state_dict(state_dict, strict=not report.head_replaced)
    return report


def reference_checkpoint(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """`{"model": state_dict}` on the CPU: the reference layout, which `load_pretrained` reads back."""
    return {"model": {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}}
