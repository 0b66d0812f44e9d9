"""The typed configuration of a training run: one small pydantic model per component (data with its
augmentation, model, optim, schedule, checkpoint, mlflow, scaling), read from YAML with
`--set a.b=c` overrides and validated before anything else runs; errors name the field. Its
conventions (batch sizes, learning-rate scaling) and bounds: docs/design/training.md.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from torch import nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import vitae
from data_prep.dataset import OnBadSample
from infra.config_files import FieldError, first_problem, read_yaml
from infra.errors import UserError

LR_REFERENCE_BATCH = 512
# Fields that may change when a run is resumed: they do not alter what is computed.
RESUMABLE_CHANGES = frozenset({
    "data.loader_workers", "scaling.use_gpu", "scaling.resources_per_worker", "scaling.placement_strategy",
    "checkpoint.num_to_keep", "checkpoint.max_failures", "mlflow.log_model", "mlflow.tracking_uri",
    "mlflow.parent_run_id", "data.on_bad_sample", "checkpoint.every_steps", "checkpoint.every_minutes",
    "checkpoint.upload", "checkpoint.preemption_check_steps", "scaling.num_workers",
})

# Upper bounds of sizes, far above any published recipe but below what would exhaust a machine.
MAX_DEPTH = 64  # normal cells: twice the deepest family (vitae_h, 32); validation builds every cell
MAX_IMG_SIZE = 1024  # pixels: ViTAE's first cells attend over (img_size / 4)^2 tokens, quartic in memory
MAX_MLP_RATIO = 16.0  # published ViTAE models use 2 to 4
MAX_BATCH_SIZE = 4096  # images per worker and micro-step
MAX_SHUFFLE_BUFFER = 100_000  # undecoded samples of a shuffle window held by each DataLoader process
MAX_LOADER_WORKERS = 64  # DataLoader processes per worker
MAX_ACCUMULATION_STEPS = 1024
MAX_EPOCHS = 10_000
MAX_NUM_WORKERS = 4096  # Ray Train workers: beyond any cluster Ray supports
MAX_SEED = 2**32 - 1  # what NumPy's and Python's seeded generators take everywhere
MAX_CHECKPOINT_MINUTES = 24 * 60.0  # a checkpoint at least once a day
MAX_PREEMPTION_CHECK_STEPS = 10_000  # optimizer steps between two looks for a preemption notice

HEAD_PREFIX = "head."  # the classifier's parameters: trained by every run, replaced for another class count

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
PositiveInt = Annotated[int, Field(ge=1)]
RUN_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # every float finite


class AugmentSettings(_Section):
    """Training-time augmentation and target regularisation (evaluation never augments)."""

    scale: tuple[Fraction, Fraction] = (0.08, 1.0)  # random-resized-crop area, as a fraction of the image
    ratio: tuple[PositiveFloat, PositiveFloat] = (3 / 4, 4 / 3)  # its aspect-ratio range
    hflip: Fraction = 0.5  # probability of a horizontal flip
    randaugment_ops: int = Field(0, ge=0, le=8)  # RandAugment-style ops per image (0: off)
    randaugment_magnitude: float = Field(9.0, ge=0.0, le=10.0)
    mixup_alpha: float = Field(0.0, ge=0.0)  # 0: off
    cutmix_alpha: float = Field(0.0, ge=0.0)  # 0: off
    mix_prob: Fraction = 1.0  # probability that a batch is mixed (when mixup or cutmix is on)
    switch_prob: Fraction = 0.5  # probability of cutmix rather than mixup when both are on
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"expected 0 < low <= high, got {list(value)}")
        return value


class DataSettings(_Section):
    url: str = Field(min_length=1)  # a prepared dataset: s3://bucket/prefix or a local directory
    train_split: str = "train"
    val_split: str = "val"
    batch_size: int = Field(64, ge=1, le=MAX_BATCH_SIZE)  # per worker and micro-step
    loader_workers: int = Field(2, ge=0, le=MAX_LOADER_WORKERS)  # DataLoader processes per worker
    shuffle_buffer: int = Field(1000, ge=1, le=MAX_SHUFFLE_BUFFER)  # samples: an epoch is shuffled in windows of it
    mean: tuple[float, float, float] | None = None  # default: the model's pretrained_cfg
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = None  # default: the model's
    crop_pct: float | None = Field(None, gt=0.0, le=1.0)  # evaluation centre crop; default: the model's
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bicubic"
    on_bad_sample: OnBadSample = "skip"  # skip: warn and count (metric skipped_samples); fail: stop the run
    augment: AugmentSettings = Field(default_factory=AugmentSettings)


class ModelSettings(_Section):
    name: str = "vitae_t"
    img_size: int = Field(224, ge=1, le=MAX_IMG_SIZE)
    depth: int | None = Field(None, ge=1, le=MAX_DEPTH)  # normal cells (see vitae.create_model); default: the model's
    mlp_ratio: float | None = Field(None, gt=0.0, le=MAX_MLP_RATIO)
    drop_path_rate: float = Field(0.1, ge=0.0, lt=1.0)
    compile: bool = False  # torch.compile the model on each worker
    channels_last: bool = False
    bf16: bool = True  # bfloat16 autocast on GPU workers (CPU workers compute in float32)
    grad_checkpointing: bool = False  # recompute normal cells in the backward pass: less memory, more compute
    # The initial weights (docs/fine-tuning.md): a checkpoint file (path or s3://), an MLflow model
    # (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model), or a training run's latest
    # checkpoint (run:NAME in this checkpoint.storage_path, run:STORAGE_PATH/NAME). None: random.
    pretrained: str | None = Field(None, min_length=1)
    freeze: list[str] = Field(default_factory=list)  # fnmatch patterns of parameter names kept frozen; never the head

    @model_validator(mode="after")
    def _buildable(self) -> ModelSettings:
        if not vitae.is_model(self.name):
            raise _field_error("model.name", f"unknown model {self.name!r}; see `vitae models`")
        with torch.device("meta"):  # builds the architecture without allocating weights
            model = self.create(num_classes=2)
        names = [name for name, _ in model.named_parameters() if not name.startswith(HEAD_PREFIX)]
        for pattern in self.freeze:
            if not fnmatch.filter(names, pattern):
                raise _field_error("model.freeze", f"{pattern!r} matches no parameter of {self.name} "
                                                   f"(they are named like {names[0]}; the head is never frozen)")
        return self

    def create(self, num_classes: int) -> nn.Module:
        """The model this section describes, randomly initialised on the default device."""
        return vitae.create_model(self.name, num_classes=num_classes, img_size=self.img_size, depth=self.depth,
                                  mlp_ratio=self.mlp_ratio, drop_path_rate=self.drop_path_rate)


class OptimSettings(_Section):
    lr: PositiveFloat = 5e-4  # peak learning rate per 512 images of global batch
    weight_decay: float = Field(0.05, ge=0.0)  # not applied to norms, biases and no_weight_decay()
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    grad_clip_norm: PositiveFloat | None = 5.0  # None: no clipping
    accumulation_steps: int = Field(1, ge=1, le=MAX_ACCUMULATION_STEPS)
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)  # None: no EMA of the weights
    # Layer-wise lr decay (BEiT/MAE fine-tuning): a cell's lr is scaled by layer_decay^(cells after
    # it, the head counting one), the embedding lowest, the head 1.0 (cells: vitae.ViTAE.layer_ids).
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)  # None: the same lr everywhere


class ScheduleSettings(_Section):
    """Per optimizer step: linear warmup from `warmup_start_factor * lr`, then cosine decay to
    `min_lr_ratio * lr` at the end of the last epoch."""

    epochs: int = Field(100, ge=1, le=MAX_EPOCHS)
    warmup_epochs: float = Field(5.0, ge=0.0)
    warmup_start_factor: float = Field(0.001, gt=0.0, le=1.0)
    min_lr_ratio: Fraction = 0.01


class CheckpointSettings(_Section):
    storage_path: str = Field(min_length=1)  # s3://bucket/prefix, or a directory every node shares
    num_to_keep: PositiveInt | None = 2  # the best epochs by validation top-1; the latest is always kept
    max_failures: int = Field(2, ge=-1)  # worker failures to recover from (-1: no limit)
    every_steps: PositiveInt | None = None  # also checkpoint within epochs, every this many optimizer steps
    every_minutes: float | None = Field(None, gt=0, le=MAX_CHECKPOINT_MINUTES)  # ... and/or this often
    upload: Literal["async", "sync"] = "async"  # async: the upload overlaps the next steps
    preemption_check_steps: int = Field(20, ge=0, le=MAX_PREEMPTION_CHECK_STEPS)  # 0: no checkpoint on notice


class MlflowSettings(_Section):
    experiment: str = Field("vitae", min_length=1)
    tracking_uri: str | None = None  # default: the workers' MLFLOW_TRACKING_URI
    log_model: bool = True
    parent_run_id: str | None = None  # set by a sweep: the run is nested under the sweep's MLflow run

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value and re.match(r"^[a-z][a-z0-9+.-]*://[^/@]+@", value, re.IGNORECASE):
            raise ValueError("no user:password@ in the URI: set MLFLOW_TRACKING_USERNAME and "
                             "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment")
        return value


class ScalingSettings(_Section):
    # A count, or [min, max]: Ray Train's elastic training runs on as many as the cluster holds
    # (restarting the group when that changes); the lr follows the global batch (docs/design/training.md).
    num_workers: int | tuple[int, int] = 2
    use_gpu: bool = False  # NCCL between GPU workers, gloo between CPU workers
    resources_per_worker: dict[str, Annotated[float, Field(ge=0.0)]] | None = None  # default {"CPU": 1}
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # workers over nodes

    @field_validator("num_workers", mode="before")
    @classmethod
    def _count_or_bounds(cls, value: Any) -> int | tuple[int, int]:
        counts = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(counts) not in (1, 2) or not all(isinstance(n, int) and not isinstance(n, bool) for n in counts):
            raise ValueError(f"expected a number of workers or [min, max], got {value!r}")
        if not all(1 <= n <= MAX_NUM_WORKERS for n in counts) or counts[0] > counts[-1]:
            raise ValueError(f"expected 1 <= min <= max <= {MAX_NUM_WORKERS}, got {value!r}")
        return tuple(counts) if isinstance(value, (list, tuple)) else value

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    def describe(self) -> str:
        """`2 workers`, or `1 to 4 workers (elastic)`."""
        if self.min_workers == self.max_workers:
            return f"{self.max_workers} workers"
        return f"{self.min_workers} to {self.max_workers} workers (elastic)"


class TrainConfig(_Section):
    name: str  # the run: re-running the same name with the same storage resumes it
    seed: int = Field(0, ge=0, le=MAX_SEED)
    data: DataSettings
    model: ModelSettings = Field(default_factory=ModelSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    checkpoint: CheckpointSettings
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)

    @field_validator("name")
    @classmethod
    def _run_name(cls, value: str) -> str:
        if not re.fullmatch(RUN_NAME, value):
            raise ValueError("expected letters, digits, '.', '_' or '-' (starting with a letter or digit)")
        return value

    @model_validator(mode="after")
    def _warmup_within_run(self) -> TrainConfig:
        if self.schedule.warmup_epochs >= self.schedule.epochs:
            raise _field_error("schedule.warmup_epochs",
                               f"must be less than schedule.epochs ({self.schedule.epochs})")
        return self

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step on the most workers the run may have."""
        return self.data.batch_size * self.scaling.max_workers * self.optim.accumulation_steps

    @property
    def peak_lr(self) -> float:
        """The peak lr at `global_batch_size`; with fewer workers it is scaled as their global batch."""
        return self.optim.lr * self.global_batch_size / LR_REFERENCE_BATCH


def _field_error(field: str, message: str) -> FieldError:
    return FieldError(f"{field}: {message}")


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read `path` (YAML), apply `a.b=c` overrides (values in YAML syntax) and validate."""
    raw = read_yaml(Path(path))
    for override in overrides:
        apply_override(raw, override)
    return parse_config(raw)


def parse_config(raw: Any) -> TrainConfig:
    """Validate a plain mapping; `UserError` naming the first bad field."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"invalid config: {first_problem(error)}") from None


def flatten(config: TrainConfig) -> dict[str, Any]:
    """`{"data.url": ..., "model.depth": ...}`: the full resolved config as flat keys."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value

    walk("", config.model_dump(mode="json"))
    return flat


def config_changes(previous: TrainConfig, current: TrainConfig) -> list[str]:
    """The fields, as `key: old -> new`, that differ and may not change when a run resumes."""
    old, new = flatten(previous), flatten(current)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and not any(key.startswith(f) for f in RESUMABLE_CHANGES)]


def to_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def apply_override(raw: dict, override: str) -> None:
    """`a.b=c` (the value in YAML syntax) set in the mapping `raw`."""
    key, separator, text = override.partition("=")
    if not separator or not key.strip():
        raise UserError(f"--set {override!r}: expected KEY=VALUE, e.g. model.depth=4")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"--set {override!r}: the value is not valid YAML") from None
    set_value(raw, key.strip(), value, f"--set {override!r}")


def set_value(raw: dict, key: str, value: Any, where: str) -> None:
    """`raw["a"]["b"] = value` for the dotted `key` "a.b", creating sections; `where` names the source in errors."""
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{where}: {part} is not a section")
        node = child
    node[leaf] = value
