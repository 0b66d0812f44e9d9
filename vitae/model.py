"""The ViTAE network shell shared by every family: stages of (RC, NCs), pooling and the head.

Every model has the same face, which training code relies on instead of a model's internals:
`forward_features` (tokens of the last stage), `forward_head(pre_logits=False)`, `reset_classifier`,
`no_weight_decay`, `set_grad_checkpointing`, `layer_ids` (depths for layer-wise learning-rate decay)
and `pretrained_cfg` (input size and normalisation).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Stage(nn.Module):
    """One reduction cell (`RC`, identity when the stage keeps the resolution) then normal cells (`NC`)."""

    def __init__(self, reduction_cell: nn.Module, normal_cells: Sequence[nn.Module]):
        super().__init__()
        self.RC = reduction_cell
        self.NC = nn.ModuleList(normal_cells)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.RC(x)
        for cell in self.NC:
            if self.grad_checkpointing and self.training:
                x = checkpoint(cell, x, use_reentrant=False)
            else:
                x = cell(x)
        return x


class ViTAE(nn.Module):
    """Stages, then the mean over tokens (over patch tokens and `fc_norm` when there is a class
    token), then a linear classifier."""

    def __init__(self, stages: Sequence[Stage], num_features: int, num_classes: int = 1000,
                 class_token: bool = False, pretrained_cfg: dict[str, Any] | None = None):
        super().__init__()
        self.num_features = num_features
        self.num_classes = num_classes
        self.class_token = class_token
        self.layers = nn.ModuleList(stages)
        self.fc_norm = nn.LayerNorm(num_features, eps=1e-6) if class_token else nn.Identity()
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = dict(pretrained_cfg or {}, num_classes=num_classes, classifier="head")
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, N, num_features) tokens of the last stage."""
        for stage in self.layers:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 1:].mean(dim=1) if self.class_token else x.mean(dim=1)
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for `num_classes` (0 removes it)."""
        self.num_classes = num_classes
        self.pretrained_cfg["num_classes"] = num_classes
        device = next(self.parameters()).device
        self.head = nn.Linear(self.num_features, num_classes).to(device) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names that weight decay must skip (besides norms and biases)."""
        return {name for name, _ in self.named_parameters() if name.endswith(("cls_token", "pos_embed"))}

    @torch.jit.ignore
    def layer_ids(self) -> tuple[dict[str, int], int]:
        """Each parameter's depth, for layer-wise learning-rate decay, and the head's: the cells that
        have parameters (reduction and normal cells) count 0, 1, ... in forward order, the first one
        being the embedding (pixels to tokens); `fc_norm` and the head come last."""
        cells: dict[str, int] = {}
        ids: dict[str, int] = {}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if parts[0] == "layers":  # layers.{stage}.RC.* or layers.{stage}.NC.{cell}.*
                cell = ".".join(parts[:3] if parts[2] == "RC" else parts[:4])
                ids[name] = cells.setdefault(cell, len(cells))
        top = len(cells)
        return {name: ids.get(name, top) for name, _ in self.named_parameters()}, top

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute normal cells in the backward pass instead of storing their activations."""
        for stage in self.layers:
            stage.grad_checkpointing = enable


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def image_cfg(img_size: int, in_chans: int, **extra: Any) -> dict[str, Any]:
    """The preprocessing a model expects: input size and ImageNet normalisation by default."""
    return {"input_size": (in_chans, img_size, img_size), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "interpolation": "bicubic", "crop_pct": 0.9, **extra}
