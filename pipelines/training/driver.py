"""`vitae train` and `python -m pipelines.train` (the `ray job submit` entrypoint): the driver of a
training run. It checks the config, dataset, storage, initial weights and cluster, holds the run's
name and fits a Ray Train `TorchTrainer` whose workers run `pipelines.training.worker.train_worker`
(docs/design/training.md).
"""

from __future__ import annotations

import argparse
from typing import Sequence

import ray
import ray.train
from ray.train.torch import TorchTrainer

from data_prep.dataset import PreparedDataset
from infra.errors import UserError
from pipelines.training.config import TrainConfig, config_changes, load_config
from pipelines.training.failures import UserErrorsEndTheRun, user_error
from pipelines.training.initial_weights import InitialWeights, initial_weights_for
from pipelines.training.ray_cluster import cluster_capacity, connect_to_ray, require_resources
from pipelines.training.run_storage import RunStorage
from pipelines.training.sharding import steps_per_epoch
from pipelines.training.train_state import read_checkpoint_config
from pipelines.training.worker import train_worker


def train_command(args: argparse.Namespace) -> int:
    run_training(load_config(args.config, args.overrides))
    return 0


def run_training(config: TrainConfig) -> None:
    """The user's driver of run `config.name`: checks, then fits it holding its name."""
    check_dataset(config)
    storage = RunStorage.open(config.checkpoint.storage_path)
    how_it_starts = check_resumable(config, storage)
    initial_weights = initial_weights_for(config, storage)
    connect_to_ray()
    check_resources(config)
    with storage.hold(config.name):
        print(how_it_starts, flush=True)
        if initial_weights:
            print(initial_weights.describe(), flush=True)
        print(f"{config.scaling.describe()}, global batch {config.global_batch_size}, "
              f"peak lr {config.peak_lr:.2e}, {config.schedule.epochs} epochs", flush=True)
        result = fit(config, storage, initial_weights=initial_weights)
    report(result, storage.run_url(config.name))


def check_dataset(config: TrainConfig) -> None:
    """The dataset exists, has both splits and enough training samples for one step per worker."""
    dataset = PreparedDataset.open(config.data.url)
    for field, split in (("data.train_split", config.data.train_split), ("data.val_split", config.data.val_split)):
        if dataset.num_samples(split) == 0:
            raise UserError(f"{field}: {config.data.url} has no samples in split {split!r} "
                            f"(it has: {', '.join(dataset.splits)})")
    train_samples = dataset.num_samples(config.data.train_split)
    if steps_per_epoch(train_samples, config.scaling.max_workers, config.data.batch_size) == 0:
        raise UserError(f"data.batch_size: {train_samples} training samples do not fill one batch of "
                        f"{config.data.batch_size} on each of {config.scaling.max_workers} workers")


def check_resources(config: TrainConfig) -> None:
    """The cluster can hold the run's workers, at least the minimum of an elastic run (Ray would wait
    for them forever)."""
    least = scaling_config(config, num_workers=config.scaling.min_workers)
    require_resources(least.total_resources, cluster_capacity(), f"run {config.name} ({config.scaling.describe()})",
                      "use fewer or smaller workers (scaling.num_workers, scaling.resources_per_worker, "
                      "scaling.use_gpu) or a larger cluster")


def check_resumable(config: TrainConfig, storage: RunStorage) -> str:
    """A run that exists under this name is resumed, with the same config; says how the run starts."""
    previous = storage.previous_result(config.name)
    if previous is None or previous.checkpoint is None:
        return f"run {config.name}: starting (checkpoints in {storage.run_url(config.name)})"
    changes = config_changes(TrainConfig.model_validate(read_checkpoint_config(previous.checkpoint)), config)
    if changes:
        raise UserError(f"run {config.name} exists in {storage.url} with another config ({'; '.join(changes)}): "
                        "resume it unchanged or choose a new name")
    metrics = previous.metrics
    if "within_epoch" in metrics:  # a checkpoint taken within an epoch
        return (f"run {config.name}: resuming within epoch {metrics['within_epoch']} of {config.schedule.epochs} "
                f"(step {metrics['step']})")
    return f"run {config.name}: resuming after epoch {metrics['epoch']} of {config.schedule.epochs}"


def fit(config: TrainConfig, storage: RunStorage, callbacks: Sequence = (),
        initial_weights: InitialWeights | None = None):
    """Run (or resume) training run `config.name`; `callbacks` go to Ray Train's RunConfig (a sweep's
    trial passes Tune's `TuneReportCallback`). `initial_weights` default: read here if the run starts
    from `model.pretrained`; they go to the workers through Ray's object store. A failure the user can
    fix (see `failures.user_error`) ends the run without restarts and is raised as one `UserError` line."""
    initial_weights = initial_weights or initial_weights_for(config, storage)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(mode="json"),
                           "initial_weights": ray.put(initial_weights) if initial_weights else None},
        scaling_config=scaling_config(config),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=storage.path,
            storage_filesystem=storage.filesystem,
            callbacks=[*callbacks, UserErrorsEndTheRun()],
            failure_config=ray.train.FailureConfig(max_failures=config.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep,
                                                         checkpoint_score_attribute="val_top1",
                                                         checkpoint_score_order="max"),
        ),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as failure:
        cause = user_error(failure)
        if cause is None:
            raise
        raise UserError(f"training run {config.name} failed: {cause}") from None


def scaling_config(config: TrainConfig, num_workers: int | tuple[int, int] | None = None):
    """Ray Train's ScalingConfig of the run, or of `num_workers` of its workers (its `total_resources`
    is what the workers occupy; for an elastic run, the most workers)."""
    return ray.train.ScalingConfig(num_workers=num_workers or config.scaling.num_workers,
                                   use_gpu=config.scaling.use_gpu,
                                   resources_per_worker=config.scaling.resources_per_worker,
                                   placement_strategy=config.scaling.placement_strategy)


def report(result, run_url: str) -> None:
    metrics = result.metrics or {}
    outcome = result.return_value or {}
    print(f"done: epoch {metrics.get('epoch')}, val_top1 {metrics.get('val_top1', float('nan')):.2%}, "
          f"val_loss {metrics.get('val_loss', float('nan')):.4f}")
    print(f"checkpoints: {run_url} (latest: {result.checkpoint.path if result.checkpoint else 'none'})")
    print(f"MLflow run: {outcome.get('mlflow_run_url')}")
    print(f"model: {outcome.get('model_uri')}")

