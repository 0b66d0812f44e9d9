"""The model as it leaves training, owned here: `PackagedClassifier` (uint8 RGB images at the training
resolution in, normalised as training did, class logits out) and its metadata `ClassifierInfo` (class
names, image size, mean/std, evaluation resize, architecture): what a consumer of the model needs.
Its module path is recorded in every logged model (pickled class paths): it must keep it."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from infra.errors import UserError
from pipelines.training.augment import normalize


@dataclass(frozen=True)
class ClassifierInfo:
    architecture: str
    class_names: list[str]
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str
    input: str = ("pytorch flavour: uint8 RGB images, shape (batch, 3, img_size, img_size), values 0-255; "
                  "pyfunc: encoded images (or paths, PIL images, uint8 arrays) of any size")
    output: str = ("pytorch flavour: class logits, shape (batch, len(class_names)); "
                   "pyfunc: per image, the top-k class indices, names and probabilities")

    def metadata(self) -> dict:
        return asdict(self)

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> ClassifierInfo:
        """Read back from a logged model's metadata (a YAML mapping: tuples come back as lists)."""
        if not metadata or "class_names" not in metadata:
            raise UserError("the model's metadata has no class_names: not a classifier logged by vitae")
        values = {field.name: metadata[field.name] for field in fields(cls) if field.name in metadata}
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})


class PackagedClassifier(nn.Module):
    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(images, self.mean, self.std))


def package(model: nn.Module, info: ClassifierInfo) -> PackagedClassifier:
    """A float32 CPU copy in eval mode, with the normalisation inside."""
    return PackagedClassifier(copy.deepcopy(model).float().cpu().eval(), info.mean, info.std).eval()
