"""The model registry: named configurations and the single construction path `create_model`."""

from __future__ import annotations

import fnmatch
from typing import Callable

from torch import nn

_MODEL_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make `fn` (a function named after the model) constructible by name."""
    _MODEL_ENTRYPOINTS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, e.g. `list_models("vitaev2_*")`, in
    registration order (by family, then size)."""
    return [name for name in _MODEL_ENTRYPOINTS if fnmatch.fnmatch(name, pattern)]


def is_model(name: str) -> bool:
    return name in _MODEL_ENTRYPOINTS


def create_model(name: str, num_classes: int = 1000, img_size: int = 224, in_chans: int = 3,
                 depth: int | None = None, mlp_ratio: float | None = None, drop_path_rate: float = 0.0,
                 **overrides) -> nn.Module:
    """Build a registered model.

    `depth` and `mlp_ratio` override the architecture where the hyperparameter search needs it:
    the number of normal cells (ViTAE v1 and isotropic models; stage 3 of ViTAEv2) and the MLP
    expansion of the normal cells. Other keyword arguments go to the family's builder.
    """
    if name not in _MODEL_ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODEL_ENTRYPOINTS[name](num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                                    depth=depth, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
                                    **overrides)
