"""The model as it leaves training: a self-describing classifier logged to MLflow.

`PackagedClassifier` takes what a client has, uint8 RGB images (B, 3, H, W) at the training
resolution, normalises them exactly as training did (`augment.normalize`) and returns class
logits. It is logged in MLflow's `pt2` format (torch.export; needs the input example) with a
tensor signature, and its metadata records what a consumer needs: class names in index order,
image size, mean/std, the evaluation resize (crop_pct, interpolation) and the architecture.
The registry and promotion work builds on `ClassifierInfo` and `log_classifier`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipelines.augment import normalize

MODEL_NAME = "model"  # the logged model's name within its run
EXAMPLE_BATCH = 2  # > 1, so that torch.export keeps the batch dimension dynamic


@dataclass(frozen=True)
class ClassifierInfo:
    architecture: str
    class_names: list[str]
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str
    input: str = "uint8 RGB images, shape (batch, 3, img_size, img_size), values 0-255"
    output: str = "class logits, shape (batch, len(class_names))"

    def metadata(self) -> dict:
        return asdict(self)


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
    import mlflow
    from mlflow.models import infer_signature

    packaged = package(model, info)
    example = torch.randint(0, 256, (EXAMPLE_BATCH, 3, info.img_size, info.img_size), dtype=torch.uint8)
    with torch.no_grad():
        logits = packaged(example)
    signature = infer_signature(example.numpy(), logits.numpy())
    with mlflow.start_run(run_id=run_id):
        logged = mlflow.pytorch.log_model(
            packaged, name=MODEL_NAME, input_example=example.numpy(), signature=signature,
            metadata=info.metadata(), serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    return logged.model_uri
