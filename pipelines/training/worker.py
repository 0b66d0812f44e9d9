"""The function Ray Train runs on every worker (`train_worker`), assembled in reading order from this
package's pieces: rank and device -> model (with its initial weights) -> data -> optimisation and
progress, restored from the latest checkpoint (at an epoch's end or within one) -> DDP -> MLflow
(rank 0) -> per epoch: train (checkpointing within the epoch when due), validate, log, checkpoint ->
the final model. One training step per batch, with gradient accumulation (docs/design/training.md).
"""

from __future__ import annotations

import contextlib
import logging
import operator
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterable, Iterator

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from data_prep.dataset import PreparedDataset
from pipelines.training.augment import EvalTransform, TrainTransform, normalize
from pipelines.training.train_state import CheckpointCadence, Checkpointer, RngState, TrainProgress
from pipelines.training.validation import EvalTotals, broadcast_buffers, evaluate
from pipelines.training.input_pipeline import (ReaderLayout, SplitShards, epoch_batches, eval_loader, skipped_samples,
                                               train_loader)
from pipelines.training.mixing import Mixing
from pipelines.model_packaging import ClassifierInfo
from pipelines.training.initial_weights import InitialWeights
from pipelines.training.optim import (build_ema, build_optimizer, build_scheduler, copy_buffers, freeze, peak_group_lr,
                                      refresh_lr)
from pipelines.training.ray_logging import quiet_worker
from pipelines.training.sharding import EpochPlan, block_count, steps_per_epoch
from pipelines.training.step_timing import PhaseTimer
from pipelines.tracking.training_run import TrainingRun
from pipelines.training.config import TrainConfig, flatten, to_yaml

logger = logging.getLogger(__name__)  # Ray Train forwards worker logs to the driver's console


@dataclass(frozen=True)
class WorkerEnv:
    rank: int
    world_size: int
    device: torch.device
    node_id: str = "local"  # the Ray node it runs on

    @classmethod
    def current(cls) -> WorkerEnv:
        context = ray.train.get_context()
        return cls(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                   ray.get_runtime_context().get_node_id())


@dataclass
class DataSetup:
    class_names: list[str]
    train: SplitShards
    val: SplitShards
    layout: ReaderLayout
    train_transform: TrainTransform
    eval_transform: EvalTransform
    to_model_input: Callable[[torch.Tensor], torch.Tensor]  # uint8 batch on the device -> normalised input
    info: ClassifierInfo
    steps_per_epoch: int  # micro-steps per rank in a whole epoch read by this group
    epoch_blocks: int  # batch-sized blocks of an epoch, whoever reads them


@dataclass
class Training:
    model: nn.Module  # the module itself: checkpointed, evaluated, packaged
    wrapped: nn.Module  # what a training step calls (DDP when distributed)
    ema: torch.optim.swa_utils.AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: TrainProgress
    checkpointer: Checkpointer
    cadence: CheckpointCadence  # checkpoints within epochs
    epoch_stats: EpochStats  # this rank's statistics of the epoch under way (checkpointed within it)
    mixing: Mixing
    mixing_rng: random.Random
    criterion: nn.Module
    autocast: Callable[[], contextlib.AbstractContextManager]


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    samples: int = 0
    steps: int = 0
    data_wait_s: float = 0.0
    elapsed_s: float = 0.0
    forward_s: float = 0.0  # host-to-device copy, normalisation, mixing, forward pass and loss
    backward_s: float = 0.0
    optimizer_s: float = 0.0  # clipping, optimizer and scheduler steps, EMA update
    checkpoint_s: float = 0.0  # saving and reporting checkpoints within the epoch (their upload, if sync)
    checkpoints: int = 0  # checkpoints taken within the epoch

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def reset(self) -> None:
        self.load_state_dict(asdict(EpochStats()))

    def merge_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """The statistics of a group of another size (every saved rank's on rank 0, none elsewhere):
        their sums (steps and checkpoints: the most)."""
        self.reset()
        for state in states:
            for key, value in state.items():
                combine = max if key in ("steps", "checkpoints") else operator.add
                setattr(self, key, combine(getattr(self, key), value))

    def all_reduced(self, device: torch.device) -> EpochStats:
        """Sums over ranks (steps: the most any rank ran)."""
        if not dist.is_initialized():
            return self
        sums = torch.tensor([self.loss_sum, self.samples, self.data_wait_s, self.elapsed_s, self.forward_s,
                             self.backward_s, self.optimizer_s, self.checkpoint_s], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        steps = torch.tensor([self.steps], device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        loss_sum, samples, data_wait_s, elapsed_s, forward_s, backward_s, optimizer_s, checkpoint_s = sums.tolist()
        return EpochStats(loss_sum, int(samples), int(steps.item()), data_wait_s, elapsed_s, forward_s, backward_s,
                          optimizer_s, checkpoint_s, self.checkpoints)


def train_worker(loop_config: dict) -> dict[str, str | None]:
    """Ray Train's per-worker entry point: `loop_config` holds the config (as JSON) and the initial
    weights' object reference (or None); rank 0 returns where the results are in MLflow."""
    config = TrainConfig.model_validate(loop_config["config"])
    quiet_worker()
    env = WorkerEnv.current()
    dataset = PreparedDataset.open(config.data.url)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config, len(dataset.class_names)).to(env.device)
    initial = received_weights(loop_config["initial_weights"])
    if initial is not None:
        initial.load_into(model)
    data = build_data(config, env, dataset, model.pretrained_cfg)
    training = build_training(config, env, model, data.epoch_blocks)
    tracker = attach_tracker(config, data, training.progress, initial) if env.rank == 0 else None
    try:
        for epoch in range(training.progress.epoch, config.schedule.epochs):
            run_epoch(config, env, data, training, tracker, epoch)
        return finish_training(config, training, data, tracker) if tracker else {}
    except BaseException:
        if tracker:
            tracker.finish("FAILED")
        raise


def received_weights(reference: ray.ObjectRef | None) -> InitialWeights | None:
    """The initial weights the driver put in the object store, unless this worker group restarts from
    the run's checkpoint, which holds its weights (then they are not even fetched)."""
    if reference is None or ray.train.get_checkpoint() is not None:
        return None
    return ray.get(reference)


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    """The run's model, randomly initialised, with its frozen parameters and activation checkpointing."""
    spec = config.model
    model = spec.create(num_classes)
    freeze(model, spec.freeze)
    model.set_grad_checkpointing(spec.grad_checkpointing)
    return model.to(memory_format=torch.channels_last) if spec.channels_last else model


def build_data(config: TrainConfig, env: WorkerEnv, dataset: PreparedDataset, pretrained_cfg: dict) -> DataSetup:
    spec, augment = config.data, config.data.augment
    mean, std = spec.mean or pretrained_cfg["mean"], spec.std or pretrained_cfg["std"]
    crop_pct = spec.crop_pct or pretrained_cfg["crop_pct"]
    img_size = config.model.img_size
    train = SplitShards.of(dataset, spec.train_split)
    mean_t, std_t = (torch.tensor(values, device=env.device) for values in (mean, std))
    memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format

    def to_model_input(images: torch.Tensor) -> torch.Tensor:
        return normalize(images, mean_t, std_t).contiguous(memory_format=memory_format)

    return DataSetup(
        class_names=dataset.class_names,
        train=train,
        val=SplitShards.of(dataset, spec.val_split),
        layout=ReaderLayout(env.rank, env.world_size, spec.loader_workers, pin_memory=env.device.type == "cuda"),
        train_transform=TrainTransform(img_size, augment.scale, augment.ratio, augment.hflip,
                                       augment.randaugment_ops, augment.randaugment_magnitude, spec.interpolation),
        eval_transform=EvalTransform(img_size, crop_pct, spec.interpolation),
        to_model_input=to_model_input,
        info=ClassifierInfo(config.model.name, dataset.class_names, img_size, tuple(mean), tuple(std), crop_pct,
                            spec.interpolation),
        steps_per_epoch=steps_per_epoch(train.total, env.world_size, spec.batch_size),
        epoch_blocks=train.total // spec.batch_size,
    )


def build_training(config: TrainConfig, env: WorkerEnv, model: nn.Module, epoch_blocks: int) -> Training:
    """Optimisation state, restored from the latest checkpoint if any, then the DDP wrapper."""
    training = fresh_training(config, env, model, epoch_blocks)
    progress = training.progress
    if training.checkpointer.restore_latest():
        progress.resumed()
        if env.rank == 0:
            within = f", batch {progress.epoch_batches} of epoch {progress.epoch + 1}" if progress.epoch_batches else ""
            logger.info(f"restored the checkpoint after epoch {progress.epoch} of {config.schedule.epochs}"
                        f"{within} (step {progress.step})")
    training.cadence.preemption_check_steps = config.checkpoint.preemption_check_steps  # Ray Train's notices
    if config.model.compile:
        model.compile()
    training.wrapped = ray.train.torch.prepare_model(model)
    return training


def fresh_training(config: TrainConfig, env: WorkerEnv, model: nn.Module, epoch_blocks: int) -> Training:
    """Optimisation state from scratch, without Ray (`wrapped` is the model itself). The lr schedule
    follows the epochs read (`epochs_read`); its peak, the global batch of this group's size."""
    torch.manual_seed(config.seed + env.rank + 1)  # distinct drop-path masks per rank
    random.seed(f"{config.seed}:{env.rank}")
    ema = build_ema(model, config.optim.ema_decay)
    optimizer = build_optimizer(model, config.optim, config.peak_lr)
    progress, epoch_stats = TrainProgress(), EpochStats()
    scheduler = build_scheduler(optimizer, config.schedule, lambda _: epochs_read(progress, epoch_blocks),
                                lambda: env.world_size / config.scaling.max_workers)
    mixing_rng = random.Random(f"mixing:{config.seed}:{env.rank}")
    states = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "progress": progress,
              **({"ema": ema} if ema else {})}
    augment = config.data.augment
    use_bf16 = env.device.type == "cuda" and config.model.bf16
    return Training(
        model=model,
        wrapped=model,
        ema=ema,
        optimizer=optimizer,
        scheduler=scheduler,
        progress=progress,
        checkpointer=Checkpointer(states, {"rng": RngState(mixing_rng), "epoch_stats": epoch_stats}, env.rank,
                                  config.model_dump_json(indent=2), config.checkpoint.upload, env.world_size),
        cadence=CheckpointCadence(config.checkpoint.every_steps, config.checkpoint.every_minutes),
        epoch_stats=epoch_stats,
        mixing=Mixing(model.num_classes, augment.mixup_alpha, augment.cutmix_alpha,
                      augment.mix_prob, augment.switch_prob),
        mixing_rng=mixing_rng,
        criterion=nn.CrossEntropyLoss(label_smoothing=augment.label_smoothing),
        autocast=lambda: torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16),
    )


def epochs_read(progress: TrainProgress, epoch_blocks: int) -> float:
    """The run's progress in epochs: those completed and the part of the one under way read so far."""
    if progress.epoch_plan is None:
        return float(progress.epoch)
    plan = EpochPlan.from_state(progress.epoch_plan)
    return progress.epoch + plan.blocks_read(progress.epoch_batches) / epoch_blocks


def attach_tracker(config: TrainConfig, data: DataSetup, progress: TrainProgress,
                   initial: InitialWeights | None) -> TrainingRun:
    derived = {"derived.global_batch_size": config.global_batch_size, "derived.peak_lr": config.peak_lr,
               "derived.steps_per_epoch": data.steps_per_epoch, "derived.train_samples": data.train.total,
               "derived.val_samples": data.val.total, "derived.num_classes": len(data.class_names),
               **(initial.params() if initial else {})}
    tracker = TrainingRun.attach(config.name, config.mlflow.experiment, config.mlflow.tracking_uri,
                                 progress.mlflow_run_id, {**flatten(config), **derived}, to_yaml(config),
                                 parent_run_id=config.mlflow.parent_run_id, history=progress.history)
    progress.mlflow_run_id = tracker.run_id
    return tracker


def run_epoch(config: TrainConfig, env: WorkerEnv, data: DataSetup, training: Training,
              tracker: TrainingRun | None, epoch: int) -> None:
    start = time.perf_counter()
    loader = epoch_loader(config, env, data, training, epoch)
    refresh_lr(training.scheduler)  # the schedule's lr now, for this group's size
    log_placement(config, env, epoch, loader.dataset.describe_ranges())
    stats = train_epoch(config, env, data, training, loader).all_reduced(env.device)
    skipped = summed_over_ranks(skipped_samples(loader), env.device)
    evaluations = validate(config, env, data, training)
    metrics = epoch_metrics(epoch, env, training, stats, evaluations, time.perf_counter() - start)
    # bad samples (see input_pipeline): training replaced them; validation covers every sample once
    metrics.update(skipped_samples=skipped, val_skipped_samples=data.val.total - evaluations["val"].count)
    training.progress.complete_epoch(metrics)
    if tracker:
        logger.info(console_line(metrics, config.schedule.epochs))
        tracker.log_epoch(epoch + 1, metrics, training.progress.history, evaluations["val"].confusion,
                          data.class_names)
    training.checkpointer.report(metrics)
    training.cadence.done()


def epoch_loader(config: TrainConfig, env: WorkerEnv, data: DataSetup, training: Training, epoch: int) -> DataLoader:
    """This rank's batches of `epoch`, as `epoch_plan` says, from where its checkpoint was taken (a new
    epoch starts its statistics afresh; a resumed one has them restored)."""
    progress = training.progress
    if progress.epoch_plan is None:
        training.epoch_stats.reset()
    plan = epoch_plan(config, env, data, progress)
    progress.epoch_plan = plan.state()
    return train_loader(data.train, data.layout, data.train_transform, config.data.batch_size,
                        config.data.shuffle_buffer, config.seed, epoch, config.data.on_bad_sample, plan=plan,
                        start_batch=progress.epoch_batches)


def epoch_plan(config: TrainConfig, env: WorkerEnv, data: DataSetup, progress: TrainProgress) -> EpochPlan:
    """How the epoch under way is read. A new epoch: all of it, by this group. A resumed one: as it
    was planned, if this group has as many workers (then it goes on exactly as it would have, with
    the DataLoader workers it had: `data.loader_workers` applies from the next epoch); else the
    blocks it has left, planned afresh for this group, each read once."""
    if progress.epoch_plan is None:
        return EpochPlan.whole_epoch(data.epoch_blocks, env.world_size, config.data.loader_workers)
    plan = EpochPlan.from_state(progress.epoch_plan)
    if plan.world_size == env.world_size:
        return plan
    replanned = plan.replanned(progress.epoch_batches, env.world_size, config.data.loader_workers)
    if env.rank == 0:
        logger.info(f"epoch {progress.epoch + 1} goes on with {env.world_size} workers instead of {plan.world_size}: "
                    f"its {block_count(replanned.remaining)} blocks left of {data.epoch_blocks} planned afresh")
    progress.epoch_batches = 0
    return replanned


def log_placement(config: TrainConfig, env: WorkerEnv, epoch: int, reading: str) -> None:
    """Rank 0 logs, per rank, the node it runs on and what it reads this epoch. Gathered rather than
    logged by each rank: of lines of the same shape that several workers log within seconds, Ray's
    log deduplication shows one."""
    line = f"rank {env.rank} on node {env.node_id[:8]} reads {reading}"
    lines = [line]
    if dist.is_initialized():
        lines = [None] * env.world_size
        dist.all_gather_object(lines, line)
    if env.rank == 0:
        for rank_line in lines:
            logger.info(f"epoch {epoch + 1}/{config.schedule.epochs}: {rank_line}")


def train_epoch(config: TrainConfig, env: WorkerEnv, data: DataSetup, training: Training,
                loader: DataLoader) -> EpochStats:
    """The epoch's steps from `loader`'s first batch (where a resumed epoch goes on), checkpointing
    within the epoch when due; returns this rank's statistics of the whole epoch."""
    progress, stats, first = training.progress, training.epoch_stats, loader.dataset.start_batch
    steps, accumulation = sum(loader.dataset.slot_batches()), config.optim.accumulation_steps
    expected_steps = stats.steps + steps - first
    training.wrapped.train()
    clock = EpochClock(stats, PhaseTimer(env.device))
    for index, (images, labels) in enumerate(_timed(epoch_batches(loader), stats), start=first):
        clock.phases.start()
        inputs, targets = training.mixing(data.to_model_input(images.to(env.device, non_blocking=True)),
                                          labels.to(env.device, non_blocking=True), training.mixing_rng)
        group_size, ends_group = accumulation_group(index, steps, accumulation)
        with _gradient_sync(training.wrapped, ends_group):
            with training.autocast():
                loss = training.criterion(training.wrapped(inputs), targets)
            clock.phases.lap("forward")
            (loss / group_size).backward()
        clock.phases.lap("backward")
        progress.epoch_batches = index + 1  # before the schedule steps: it follows the epochs read
        if ends_group:
            optimizer_step(training, config.optim.grad_clip_norm)
            clock.phases.lap("optimizer")
        stats.loss_sum += loss.item() * len(labels)
        stats.samples += len(labels)
        stats.steps += 1
        reason = training.cadence.due(progress.step, env.device) if ends_group and index + 1 < steps else None
        if reason:
            if env.rank == 0 and reason.startswith("preemption"):
                logger.warning(f"{reason}: checkpoint at step {progress.step} (batch {index + 1} of epoch "
                               f"{progress.epoch + 1}); training goes on until the node goes")
            clock.record()
            stats.checkpoints += 1
            started = time.perf_counter()
            training.checkpointer.report_within_epoch(progress, reason)
            training.cadence.done()
            stats.checkpoint_s += time.perf_counter() - started
    clock.record()
    if stats.steps != expected_steps:
        raise RuntimeError(f"rank {env.rank} ran {stats.steps} steps, expected {expected_steps}: "
                           "the shard plan is broken")
    return replace(stats)


class EpochClock:
    """Adds the time of this stretch of an epoch (from here) to `stats`, which may hold a resumed
    epoch's earlier stretch."""

    def __init__(self, stats: EpochStats, phases: PhaseTimer):
        self.stats, self.phases = stats, phases
        self.start = time.perf_counter()
        self.base = {name: getattr(stats, name) for name in ("elapsed_s", "forward_s", "backward_s", "optimizer_s")}

    def record(self) -> None:
        self.stats.elapsed_s = self.base["elapsed_s"] + time.perf_counter() - self.start
        for phase in ("forward", "backward", "optimizer"):
            setattr(self.stats, f"{phase}_s", self.base[f"{phase}_s"] + self.phases.seconds(phase))


def accumulation_group(index: int, steps: int, accumulation: int) -> tuple[int, bool]:
    """For micro-step `index` of `steps`: the size of its accumulation group (the last one of an
    epoch may be short) and whether it ends the group (then the optimizer steps)."""
    group_start = index - index % accumulation
    group_size = min(accumulation, steps - group_start)
    return group_size, index + 1 == group_start + group_size


def optimizer_step(training: Training, grad_clip_norm: float | None) -> None:
    if grad_clip_norm is not None:
        nn.utils.clip_grad_norm_(training.model.parameters(), grad_clip_norm)
    training.optimizer.step()
    training.optimizer.zero_grad(set_to_none=True)
    training.scheduler.step()
    if training.ema is not None:
        training.ema.update_parameters(training.model)
    training.progress.step += 1


def validate(config: TrainConfig, env: WorkerEnv, data: DataSetup, training: Training) -> dict[str, EvalTotals]:
    """Validation of the model (and its EMA) on every rank's part of the split, summed over ranks."""
    broadcast_buffers(training.model)
    models = {"val": training.model}
    if training.ema is not None:
        copy_buffers(training.model, training.ema.module)
        models["val_ema"] = training.ema.module
    loader = eval_loader(data.val, data.layout, data.eval_transform, config.data.batch_size,
                         config.data.on_bad_sample)
    with training.autocast():
        totals = evaluate(models, loader, data.to_model_input, len(data.class_names), env.device)
    return {name: total.all_reduced(env.device) for name, total in totals.items()}


def epoch_metrics(epoch: int, env: WorkerEnv, training: Training, stats: EpochStats,
                  evaluations: dict[str, EvalTotals], epoch_time_s: float) -> dict[str, float]:
    """`stats` are summed over ranks: throughput is global samples over the mean rank's time; the
    phase times are means per (micro-)step and rank."""
    elapsed_sum = max(stats.elapsed_s, 1e-9)
    ms_per_step = 1000 / max(stats.steps * env.world_size, 1)
    metrics = {
        "epoch": epoch + 1,
        "step": training.progress.step,
        "lr": peak_group_lr(training.optimizer),
        "train_loss": stats.loss_sum / max(stats.samples, 1),
        "train_steps": stats.steps,
        "train_samples": stats.samples,  # every rank's, in the whole epoch
        "images_per_s": stats.samples * env.world_size / elapsed_sum,
        "data_wait_frac": stats.data_wait_s / elapsed_sum,
        "data_wait_ms": stats.data_wait_s * ms_per_step,
        "forward_ms": stats.forward_s * ms_per_step,
        "backward_ms": stats.backward_s * ms_per_step,
        "optimizer_ms": stats.optimizer_s * ms_per_step,
        "checkpoints_within": stats.checkpoints,
        "checkpoint_ms": 1000 * stats.checkpoint_s / max(stats.checkpoints * env.world_size, 1),
        "epoch_time_s": epoch_time_s,
    }
    for name, totals in evaluations.items():
        metrics.update(totals.metrics(name))
    return metrics


def summed_over_ranks(count: int, device: torch.device) -> int:
    if not dist.is_initialized():
        return count
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    return int(total.item())


def console_line(metrics: dict[str, float], epochs: int) -> str:
    ema = f"  ema_top1 {metrics['val_ema_top1']:.2%}" if "val_ema_top1" in metrics else ""
    skipped = metrics.get("skipped_samples", 0) + metrics.get("val_skipped_samples", 0)
    return (f"epoch {metrics['epoch']}/{epochs}  train_loss {metrics['train_loss']:.4f}  "
            f"val_loss {metrics['val_loss']:.4f}  val_top1 {metrics['val_top1']:.2%}  "
            f"val_top5 {metrics['val_top5']:.2%}{ema}  lr {metrics['lr']:.2e}  "
            f"{metrics['images_per_s']:,.0f} img/s  {metrics['epoch_time_s']:.1f} s  "
            f"data wait {metrics['data_wait_frac']:.0%}" + (f"  skipped {skipped:.0f} bad samples" if skipped else ""))


def finish_training(config: TrainConfig, training: Training, data: DataSetup,
                    tracker: TrainingRun) -> dict[str, str | None]:
    """Rank 0: log the final model once (the EMA if it validated better), close the MLflow run."""
    if config.mlflow.log_model and tracker.model.uri is None:
        source, weights = final_weights(training)
        tracker.model.log(weights, data.info, source)
    tracker.finish()
    return {"mlflow_run_id": tracker.run_id, "mlflow_run_url": tracker.run_url(), "model_uri": tracker.model.uri}


def final_weights(training: Training) -> tuple[str, nn.Module]:
    last = training.progress.history[-1]
    if training.ema is not None and last.get("val_ema_top1", -1.0) > last["val_top1"]:
        return "ema", training.ema.module
    return "model", training.model


def _timed(batches: Iterable, stats: EpochStats) -> Iterator:
    """`batches`, adding the time spent waiting for each to `stats.data_wait_s`."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(iterator, None)
        stats.data_wait_s += time.perf_counter() - start
        if batch is None:
            return
        yield batch


def _gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's `no_sync()` for the micro-steps that do not end an accumulation group."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()
