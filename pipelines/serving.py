"""The logged model's MLflow flavour, owned here: `save_model` saves the `PackagedClassifier` with the
`pytorch` flavour (pickle) and points `python_function` at this module, whose `_load_pyfunc` gives an
`ImageClassifierPyfunc`: raw images of any size in, top-k class names out. Its module path is recorded
in every logged model (loader_module): it must keep it. Design notes: docs/design/serving.md."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import mlflow.pyfunc
import mlflow.pytorch
import numpy
import pandas
import torch
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema
from PIL import Image
from torch import nn

from data_prep import images
from pipelines.training.augment import EvalTransform
from pipelines.model_packaging import ClassifierInfo

IMAGE_COLUMN = "image"
DEFAULT_TOP_K = 5
PREDICT_BATCH = 64  # images per forward pass
EXAMPLE_SIZES = ((3, 2), (2, 3))  # the input example's images, in multiples of img_size / 2


class ImageClassifierPyfunc:
    """What `mlflow.pyfunc.load_model` wraps: raw images -> top-k classes."""

    def __init__(self, model: nn.Module, info: ClassifierInfo, device: torch.device = torch.device("cpu")):
        self.model, self.info, self.device = model.eval().to(device), info, device
        self.transform = EvalTransform(info.img_size, info.crop_pct, info.interpolation)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pandas.DataFrame:
        top_k = int((params or {}).get("top_k", DEFAULT_TOP_K))
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        pictures = [load_image(item, index) for index, item in enumerate(image_items(model_input))]
        probabilities = [self.probabilities(pictures[start:start + PREDICT_BATCH])
                         for start in range(0, len(pictures), PREDICT_BATCH)]
        empty = torch.zeros(0, len(self.info.class_names))
        return top_k_frame(torch.cat(probabilities or [empty]), self.info.class_names, top_k)

    @torch.no_grad()
    def probabilities(self, pictures: Sequence[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.transform(picture) for picture in pictures]).to(self.device)
        return self.model(batch).float().softmax(dim=1).cpu()


def image_items(model_input: Any) -> list:
    """The images of a DataFrame (column `image`, else the first), Series, list, or one image."""
    if isinstance(model_input, pandas.DataFrame):
        column = model_input[IMAGE_COLUMN] if IMAGE_COLUMN in model_input.columns else model_input.iloc[:, 0]
        return column.tolist()
    if isinstance(model_input, (pandas.Series, list, tuple)):
        return list(model_input)
    return [model_input]


def load_image(item: Any, index: int) -> Image.Image:
    """One input (bytes, path, PIL image or uint8 array) as upright RGB pixels."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        picture = decode(bytes(item), f"image {index}")
    elif isinstance(item, (str, os.PathLike)):
        picture = decode(Path(item).read_bytes(), str(item))
    elif isinstance(item, Image.Image):
        picture = item
    elif isinstance(item, numpy.ndarray) and item.dtype == numpy.uint8:
        picture = Image.fromarray(item)
    else:
        kind = f"an array of {item.dtype}" if isinstance(item, numpy.ndarray) else type(item).__name__
        raise TypeError(f"image {index}: expected encoded bytes, a path, a PIL image or a uint8 array, got {kind}")
    return images.to_rgb(picture)


def decode(data: bytes, name: str) -> Image.Image:
    """Fully decoded pixels of encoded `data`; `RejectedImage` naming `name` if they are not an image."""
    try:
        return images.decode(data)
    except Exception as error:  # Pillow raises many types for bad bytes (see data_prep.images)
        raise images.RejectedImage(f"{name}: not a decodable image ({type(error).__name__}: {error})") from None


def top_k_frame(probabilities: torch.Tensor, class_names: Sequence[str], top_k: int) -> pandas.DataFrame:
    values, indices = probabilities.topk(min(top_k, len(class_names)), dim=1)
    names = [[class_names[index] for index in row] for row in indices.tolist()]
    return pandas.DataFrame({"label": [row[0] for row in names], "class_indices": indices.tolist(),
                             "class_names": names, "probabilities": values.tolist()})


# --- the flavour ------------------------------------------------------------------------------------


def signature():
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary)]),
        outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(Array(DataType.long), "class_indices"),
                        ColSpec(Array(DataType.string), "class_names"),
                        ColSpec(Array(DataType.double), "probabilities")]),
        params=ParamSchema([ParamSpec("top_k", DataType.long, DEFAULT_TOP_K)]),
    )


def input_example(img_size: int) -> pandas.DataFrame:
    """Two PNGs of other sizes and aspect ratios than the model's input."""
    half = max(img_size // 2, 1)
    gradient = Image.radial_gradient("L").convert("RGB")
    return pandas.DataFrame({IMAGE_COLUMN: [_png(gradient.resize((w * half, h * half))) for w, h in EXAMPLE_SIZES]})


def _png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def save_model(pytorch_model: nn.Module, path: str, mlflow_model=None, **pytorch_options) -> None:
    """The `pytorch` flavour (pickle) with this module as the `python_function` loader.

    `pytorch_options` go to `mlflow.pytorch.save_model` (signature, input_example, pip_requirements...).
    """
    mlflow_model = mlflow_model or Model()
    mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, serialization_format="pickle",
                              **pytorch_options)
    environments = mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME][mlflow.pyfunc.ENV]  # as the pytorch one
    mlflow.pyfunc.add_to_model(mlflow_model, loader_module=__name__,
                               conda_env=environments[mlflow.pyfunc.EnvType.CONDA],
                               python_env=environments[mlflow.pyfunc.EnvType.VIRTUALENV])
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


def load_classifier(path: str, device: torch.device = torch.device("cpu")) -> tuple[nn.Module, ClassifierInfo]:
    """The `PackagedClassifier` and its `ClassifierInfo` from a model directory (local path)."""
    info = ClassifierInfo.from_metadata(Model.load(path).metadata)
    return mlflow.pytorch.load_model(path, map_location=device), info


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> ImageClassifierPyfunc:
    """MLflow's pyfunc entry point; `path` is the model directory, `model_config` may name a `device`."""
    device = torch.device((model_config or {}).get("device") or "cpu")
    return ImageClassifierPyfunc(*load_classifier(path, device), device=device)
