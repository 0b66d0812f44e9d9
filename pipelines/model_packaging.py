"""The model as it leaves training: a self-describing classifier logged to MLflow.

`PackagedClassifier` takes uint8 RGB images (B, 3, H, W) at the training resolution, normalises
them exactly as training did (`augment.normalize`) and returns class logits. `log_classifier` logs
it with the project's flavour (`pipelines.serving`): `mlflow.pytorch.load_model` gives this module
back, `mlflow.pyfunc.load_model` a classifier of raw images of any size that answers class names.
The model's metadata, `ClassifierInfo`, records what a consumer needs: class names in index order,
image size, mean/std, the evaluation resize (crop_pct, interpolation) and the architecture.
The registry and promotion work builds on `ClassifierInfo` and `log_classifier`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import nn

from infra.errors import UserError
from pipelines.training.augment import normalize

MODEL_NAME = "model"  # the logged model's name within its run
DISTRIBUTION = "vitae-pipeline"  # the model's classes and its pyfunc loader come from this package


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


def log_classifier(model: nn.Module, info: ClassifierInfo, run_id: str) -> str:
    """Log `model` to the MLflow run `run_id` (which must exist); return the logged model's URI."""
    from mlflow.models import Model

    from pipelines import serving

    logged = Model.log(
        artifact_path=None,  # deprecated for `name`, but still a required positional parameter
        name=MODEL_NAME, flavor=serving, run_id=run_id, metadata=info.metadata(),
        pytorch_model=package(model, info), signature=serving.signature(),
        input_example=serving.input_example(info.img_size), pip_requirements=requirements(),
    )
    return logged.model_uri


def requirements() -> list[str]:
    """The logged model's pip requirements: this torch, and this package where it is installed as a
    distribution (a Ray job may run it from its working_dir only: then the pin is left out)."""
    pins = [f"torch=={torch.__version__.split('+')[0]}"]
    try:
        pins.append(f"{DISTRIBUTION}=={version(DISTRIBUTION)}")
    except PackageNotFoundError:
        pass
    return pins
