"""Small real classifiers for the serving, evaluation and promotion tests, made without Ray.

The training code's own pieces (`build_model`, `build_data`, the input pipeline, `build_optimizer`)
train a one-cell vitae_t on digits at 16 px in this process (one epoch: ~80% top-1 on the test
split; zero epochs: chance), and `log_classifier` logs it to the session's MLflow server.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from infra.s3 import make_client
from data_prep.dataset import PreparedDataset
from pipelines.training.validation import EvalTotals, evaluate
from pipelines.training.input_pipeline import SplitShards, eval_loader, train_loader
from pipelines.tracking.model_logging import log_classifier
from pipelines.training.optim import build_optimizer
from pipelines.model_registry.champions import DATASET_URL_TAG, register_challenger
from pipelines.training.config import TrainConfig
from pipelines.training.worker import DataSetup, WorkerEnv, build_data, build_model
from tests.support.train_helpers import prepare_dataset, tiny_config

CPU = torch.device("cpu")
EXPERIMENT = "vitae-model-tests"


@dataclass
class TinyClassifier:
    model: nn.Module  # the trained module, as training holds it (normalisation outside)
    data: DataSetup
    data_url: str
    uri: str  # the logged model

    def reference_totals(self, split: str) -> EvalTotals:
        """The training code's evaluation of `split`, on the in-memory model."""
        shards = SplitShards.of(PreparedDataset.open(self.data_url), split)
        loader = eval_loader(shards, self.data.layout, self.data.eval_transform, 64)
        return evaluate({"val": self.model}, loader, self.data.to_model_input, len(self.data.class_names), CPU)["val"]


def digits_dataset(name: str) -> str:
    """Digits at 16 px in a new bucket of the session's S3 server; returns the dataset URL."""
    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    make_client().create_bucket(Bucket=bucket)
    return prepare_dataset("digits", f"s3://{bucket}/digits16", shard_max_samples=400, digits_size=16)


def make_classifier(data_url: str, epochs: int, seed: int = 0) -> TinyClassifier:
    config = TrainConfig.model_validate(tiny_config("model-tests", data_url, "s3://unused/runs",
                                                    data={"loader_workers": 0}, seed=seed))
    dataset = PreparedDataset.open(data_url)
    torch.manual_seed(seed)
    model = build_model(config, len(dataset.class_names))
    data = build_data(config, WorkerEnv(0, 1, CPU), dataset, model.pretrained_cfg)
    train(model, data, config, epochs)
    return TinyClassifier(model.eval(), data, data_url, log(model, data))


def train(model: nn.Module, data: DataSetup, config: TrainConfig, epochs: int) -> None:
    optimizer = build_optimizer(model, config.optim, 3e-3)
    model.train()
    for epoch in range(epochs):
        for images, labels in train_loader(data.train, data.layout, data.train_transform, config.data.batch_size,
                                           config.data.shuffle_buffer, config.seed, epoch):
            loss = F.cross_entropy(model(data.to_model_input(images)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def log(model: nn.Module, data: DataSetup) -> str:
    import mlflow

    run_id = mlflow.MlflowClient().create_run(mlflow.set_experiment(EXPERIMENT).experiment_id).info.run_id
    return log_classifier(model, data.info, run_id)


def register(model_uri: str, model_name: str, data_url: str) -> str:
    """A new version of `model_name`, tagged with its dataset as a sweep registers it; @challenger."""
    return register_challenger(model_uri, model_name, {DATASET_URL_TAG: data_url})
