"""A run's initial weights (`model.pretrained`), owned here: the driver reads the source once (a
checkpoint file or `s3://` object, an MLflow model, a training run's latest checkpoint), checks it
against the run's model (every key and shape; a head for another class count is replaced) and hashes
it; each worker loads it with `vitae.load_pretrained` unless the run restarts from its own
checkpoint. How it reaches the workers (Ray's object store, once per node): docs/design/training.md.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from data_prep.dataset import PreparedDataset
from infra.errors import UserError
from infra.object_store import is_s3_url, parse_s3_url, shared_store
from pipelines.model_registry.export import reference_checkpoint_bytes
from pipelines.tracking.client import TrackingServer
from pipelines.training.config import TrainConfig
from pipelines.training.run_storage import RunStorage
from pipelines.training.train_state import STATE_NAME
from vitae.pretrained import (
    IncompatibleCheckpoint,
    LoadReport,
    fit_state_dict,
    load_pretrained,
    read_checkpoint,
    unwrap_state_dict,
)

MLFLOW_SCHEMES = ("models:/", "runs:/")
RUN_SCHEME = "run:"  # run:NAME (in the config's checkpoint.storage_path) or run:STORAGE_PATH/NAME
FIELD = "model.pretrained"


@dataclass(frozen=True)
class InitialWeights:
    source: str  # as the config gives it
    sha256: str  # of the file read (an MLflow model: of its reference-layout checkpoint, as `vitae export` writes it)
    state_dict: dict[str, torch.Tensor]  # unwrapped, as the source holds them
    report: LoadReport  # what loading them into the run's model does

    def load_into(self, model: nn.Module) -> LoadReport:
        """Give `model` these weights (a fresh head if the class count differs)."""
        return load_pretrained(model, self.state_dict)

    def params(self) -> dict[str, str]:
        """What the MLflow run records beside `model.pretrained` (the source)."""
        return {"pretrained.sha256": self.sha256, "pretrained.loaded_keys": str(self.report.loaded_keys),
                "pretrained.replaced": ", ".join(self.report.replaced) or "none",
                "pretrained.resampled": ", ".join(self.report.resampled) or "none"}

    def describe(self) -> str:
        head = (f"; head replaced ({self.report.checkpoint_classes} classes in the checkpoint)"
                if self.report.head_replaced else "")
        resampled = f"; resampled {', '.join(self.report.resampled)}" if self.report.resampled else ""
        return (f"initial weights: {self.source} (sha256 {self.sha256[:12]}, "
                f"{self.report.loaded_keys} tensors{head}{resampled})")


def initial_weights_for(config: TrainConfig, storage: RunStorage) -> InitialWeights | None:
    """What run `config.name` starts from: None without `model.pretrained`, and None when the run
    resumes (its checkpoint holds its weights: the source is not even read)."""
    if config.model.pretrained is None:
        return None
    previous = storage.previous_result(config.name)
    if previous is not None and previous.checkpoint is not None:
        return None
    return read_initial_weights(config, len(PreparedDataset.open(config.data.url).class_names))


def read_initial_weights(config: TrainConfig, num_classes: int) -> InitialWeights:
    """`config.model.pretrained` read and checked against the run's model (built on the meta device);
    a `UserError` naming `model.pretrained` and the cause if it is missing, unreadable or does not fit."""
    source = config.model.pretrained
    try:
        data = fetch(source, config)
        state_dict = unwrap_state_dict(parse(data))
        with torch.device("meta"):
            model = config.model.create(num_classes)
        _, report = fit_state_dict(state_dict, model)
    except IncompatibleCheckpoint as error:
        raise UserError(f"{FIELD}: {source} does not fit {config.model.name} at {config.model.img_size} px: "
                        f"{error}") from None
    except UserError as error:
        raise UserError(f"{FIELD}: {source}: {error}") from None
    return InitialWeights(source, hashlib.sha256(data).hexdigest(), state_dict, report)


def fetch(source: str, config: TrainConfig) -> bytes:
    """The bytes of the checkpoint that `source` names."""
    if source.startswith(MLFLOW_SCHEMES):
        return reference_checkpoint_bytes(source, TrackingServer.at(config.mlflow.tracking_uri))
    if source.startswith(RUN_SCHEME):
        return run_checkpoint(source.removeprefix(RUN_SCHEME), config.checkpoint.storage_path)
    if is_s3_url(source):
        location = parse_s3_url(source)
        store = shared_store(location.bucket)
        store.check_bucket()
        if not location.key or store.head(location.key) is None:
            raise UserError("no such object")
        return store.get_bytes(location.key)
    try:
        return Path(source).expanduser().read_bytes()
    except OSError as error:
        raise UserError(f"cannot read it ({error.strerror or error})") from None


def run_checkpoint(spec: str, default_storage: str) -> bytes:
    """The model state of training run `[STORAGE_PATH/]NAME`'s latest checkpoint (`train_state.pt`,
    whose "model" entry `vitae.load_pretrained` unwraps)."""
    storage_url, _, name = spec.rpartition("/")
    storage_url = storage_url or default_storage
    if not name:
        raise UserError("expected run:NAME or run:STORAGE_PATH/NAME")
    if not is_s3_url(storage_url) and not Path(storage_url).expanduser().is_dir():
        raise UserError(f"no checkpoint directory {storage_url}")
    result = RunStorage.open(storage_url).previous_result(name)
    if result is None or result.checkpoint is None:
        raise UserError(f"training run {name} has no checkpoint in {storage_url}")
    checkpoint = result.checkpoint
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_NAME}") as stream:
        return stream.read()


def parse(data: bytes) -> dict:
    """The checkpoint in `data`; a `UserError` if it is not one torch reads without running code."""
    try:
        checkpoint = read_checkpoint(io.BytesIO(data))
    except Exception as error:  # torch raises many types for foreign bytes (zip, pickle, unpickler errors)
        raise UserError(f"not a PyTorch checkpoint of tensors (torch.load: {load_failure(error)})") from None
    if not isinstance(checkpoint, dict) or not unwrap_state_dict(checkpoint):
        raise UserError("the checkpoint holds no tensors")
    return checkpoint


def load_failure(error: Exception) -> str:
    """The cause in torch.load's message: for the weights-only unpickler, its reason (e.g. "Unsupported
    global: GLOBAL builtins.print ..."), not the advice around it."""
    message = str(error)
    reason = message.partition("WeightsUnpickler error:")[2] or message
    first = next((line.strip() for line in reason.splitlines() if line.strip()), type(error).__name__)
    return first if len(first) <= 160 else first[:157] + "..."
