"""The typed configuration of a hyperparameter sweep (`vitae tune`): the training config its trials
start from, what is searched and how, early stopping, what each trial runs on, and what becomes of
the best trial in the model registry; validated (base and searched values) when loaded. The format,
with an example: docs/design/sweeps.md. Loading a sweep does not import Ray, so the quickstart
and the sweep benchmark load one before Ray's settings are in the environment.
"""

from __future__ import annotations

import copy
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Mapping, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from infra.config_files import first_problem, read_yaml
from infra.errors import UserError
from pipelines.training.config import MAX_SEED, TrainConfig, apply_override, parse_config, set_value

SWEEP_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"  # leaves room for "-<trial id>" within RUN_NAME
MAX_SAMPLES = 10_000  # trials in one sweep: each is a Ray Train run (~20 s of start-up at least)
# Training-config fields the sweep itself sets, so they are not searchable.
RESERVED_FIELDS = {
    "name": "each trial is named after the sweep",
    "schedule.epochs": "it is ASHA's max_t, the same for every trial (set it in overrides)",
    "scaling": "per-trial resources are set in trial (every trial must fit the derived concurrency)",
    "checkpoint": "the trials share the sweep's checkpoint storage (set it in overrides)",
    "mlflow": "the trials are tracked under the sweep's MLflow run (set it in overrides)",
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # every float finite


class Choice(_Section):
    kind: Literal["choice"]
    values: list[bool | int | float | str] = Field(min_length=1)

    @field_validator("values", mode="before")
    @classmethod
    def _finite(cls, values: Any) -> Any:
        """(The union's own error would be about the first member it tried: bool.)"""
        if isinstance(values, list) and any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ValueError(f"expected finite numbers, got {values}")
        return values

    def probes(self) -> list:
        return list(self.values)

    def to_tune(self):
        from ray import tune  # only when a Tuner is built (see the module docstring)

        return tune.choice(list(self.values))


class _Range(_Section):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        if not self.low < self.high:
            raise ValueError(f"expected low < high, got low {self.low}, high {self.high}")
        return self

    def probes(self) -> list:
        return [self.low, self.high]


class Uniform(_Range):
    kind: Literal["uniform"]

    def to_tune(self):
        from ray import tune  # only when a Tuner is built (see the module docstring)

        return tune.uniform(self.low, self.high)


class LogUniform(_Range):
    kind: Literal["loguniform"]
    low: float = Field(gt=0.0)

    def to_tune(self):
        from ray import tune  # only when a Tuner is built (see the module docstring)

        return tune.loguniform(self.low, self.high)


class RandInt(_Range):
    """Integers from `low` to `high` - 1 (`high` is exclusive, as in `ray.tune.randint`)."""

    kind: Literal["randint"]
    low: int
    high: int

    def probes(self) -> list:
        return [self.low, self.high - 1]

    def to_tune(self):
        from ray import tune  # only when a Tuner is built (see the module docstring)

        return tune.randint(self.low, self.high)


Distribution = Annotated[Union[Choice, Uniform, LogUniform, RandInt], Field(discriminator="kind")]


def default_space() -> dict[str, Distribution]:
    """Width of the MLP, number of normal cells (vitae_t has 7) and the learning rate per 512 images."""
    return {
        "model.mlp_ratio": Choice(kind="choice", values=[2.0, 3.0, 4.0]),
        "model.depth": Choice(kind="choice", values=[2, 4, 7]),
        "optim.lr": LogUniform(kind="loguniform", low=1e-4, high=1e-2),
    }


class SearchSettings(_Section):
    algorithm: Literal["random", "optuna"] = "random"  # random sampling, or Optuna's TPE
    num_samples: int = Field(8, ge=1, le=MAX_SAMPLES)  # trials
    seed: int | None = Field(0, ge=0, le=MAX_SEED)  # of the sampler (None: a different sweep every time)
    space: dict[str, Distribution] = Field(default_factory=default_space, min_length=1)

    @field_validator("space", mode="before")
    @classmethod
    def _dotted_paths(cls, value: Any) -> Any:
        """`{model: {depth: {kind: ...}}}` (as `--set search.space.model.depth=...` writes it) is
        `{model.depth: {kind: ...}}`."""
        return dict(_distribution_paths(value)) if isinstance(value, Mapping) else value


class AshaSettings(_Section):
    """Asynchronous successive halving on validation top-1, in epochs (max_t: schedule.epochs)."""

    enabled: bool = True  # False: every trial runs all its epochs
    grace_period: int = Field(1, ge=1)  # epochs before a trial can be stopped
    reduction_factor: float = Field(3.0, gt=1.0)  # 1/reduction_factor of the trials go on at each rung


class TrialResources(_Section):
    num_workers: int | None = Field(None, ge=1)  # Ray Train workers per trial (None: the base config's)
    gpus_per_worker: float | None = Field(None, ge=0.0)  # 0: CPU workers (None: as in the base config)
    driver_cpus: float = Field(1.0, ge=0.0)  # the trial's own driver, which runs TorchTrainer.fit


class RegistrySettings(_Section):
    model_name: str | None = None  # register the best trial as a new version, @challenger (None: don't)
    promote: bool = False  # then evaluate it against @champion and promote it if it is better
    split: str = "test"  # the split both are evaluated on
    metric: str = "top1"
    margin: float = Field(0.0, ge=0.0)  # the challenger must beat the champion by more than this
    lock_url: str | None = None  # the promotion lease, s3://bucket/key (None: promote's default)

    @model_validator(mode="after")
    def _promotes_a_registered_model(self) -> RegistrySettings:
        if self.promote and not self.model_name:
            raise ValueError("promote needs registry.model_name")
        return self


class SweepConfig(_Section):
    name: str
    base: str | dict[str, Any]  # a training config file (relative to the sweep file) or inline
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted keys (or nested sections) -> values
    search: SearchSettings = Field(default_factory=SearchSettings)
    asha: AshaSettings = Field(default_factory=AshaSettings)
    trial: TrialResources = Field(default_factory=TrialResources)
    max_concurrent_trials: int | None = Field(None, ge=1)  # an upper bound on what the cluster allows
    registry: RegistrySettings = Field(default_factory=RegistrySettings)

    @field_validator("name")
    @classmethod
    def _sweep_name(cls, value: str) -> str:
        if not re.fullmatch(SWEEP_NAME, value):
            raise ValueError("expected up to 100 letters, digits, '.', '_' or '-' (starting with a letter or digit)")
        return value


@dataclass(frozen=True)
class Sweep:
    config: SweepConfig
    base: TrainConfig  # the trials' training config before sampling (named after the sweep)
    path: Path  # the sweep config file, as given
    overrides: tuple[str, ...] = ()  # its `--set` overrides, as given

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def max_t(self) -> int:
        return self.base.schedule.epochs

    def trial_config(self, trial_id: str, sampled: Mapping[str, Any]) -> TrainConfig:
        return trial_config(self.base.model_dump(mode="json"), sampled, trial_run_name(self.name, trial_id))

    def resume_command(self) -> str:
        """The command line that continues this sweep where it stopped."""
        sets = [part for override in self.overrides for part in ("--set", override)]
        return shlex.join(["vitae", "tune", "--config", str(self.path), *sets, "--resume"])

    def resolved_yaml(self) -> str:
        """The sweep config with its base resolved: enough to run the same sweep again."""
        resolved = {**self.config.model_dump(mode="json"), "base": self.base.model_dump(mode="json"), "overrides": {}}
        return yaml.safe_dump(resolved, sort_keys=False)


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def trial_config(base: dict[str, Any], sampled: Mapping[str, Any], run_name: str) -> TrainConfig:
    """The training config of one trial: `base` (a TrainConfig as JSON) with the sampled values."""
    raw = copy.deepcopy(base)
    for path, value in sampled.items():
        set_value(raw, path, value.item() if hasattr(value, "item") else value, f"search.space.{path}")
    raw["name"] = run_name
    return parse_config(raw)


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Read the sweep at `path` (YAML) with `a.b=c` overrides; resolve and check its base and space."""
    path = Path(path)
    raw = read_yaml(path)
    for override in overrides:
        apply_override(raw, override)
    try:
        config = SweepConfig.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"invalid sweep config: {first_problem(error)}") from None
    sweep = Sweep(config, resolve_base(config, path.parent), path, tuple(overrides))
    check_space(sweep)
    check_asha(sweep)
    return sweep


def resolve_base(config: SweepConfig, directory: Path) -> TrainConfig:
    """`base` (read if a path) with `overrides` and the per-trial resources applied, named after the sweep."""
    if isinstance(config.base, str):
        base_path = directory / Path(config.base).expanduser()
        raw, where = read_yaml(base_path), str(base_path)
    else:
        raw, where = copy.deepcopy(config.base), "inline"
    for key, value in _leaves(config.overrides):
        set_value(raw, key, value, f"overrides.{key}")
    _apply_trial_resources(raw, config.trial)
    raw["name"] = config.name
    try:
        return parse_config(raw)
    except UserError as error:
        raise UserError(f"base ({where}, with overrides): {error}") from None


def check_space(sweep: Sweep) -> None:
    """Every searched path is a searchable TrainConfig field and every edge value a valid config."""
    base = sweep.base.model_dump(mode="json")
    for path, distribution in sweep.config.search.space.items():
        where = f"search.space.{path}"
        check_field_path(path, where)
        for value in distribution.probes():
            try:
                trial_config(base, {path: value}, trial_run_name(sweep.name, "probe"))
            except UserError as error:
                raise UserError(f"{where}: {value!r} does not make a valid training config: "
                                f"{str(error).removeprefix('invalid config: ')}") from None


def check_field_path(path: str, where: str) -> None:
    """`path` names a field (not a section) of TrainConfig that the sweep does not set itself."""
    model: type[BaseModel] = TrainConfig
    parts = path.split(".")
    for index, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            section = ".".join(parts[:index]) or "the top level"
            raise UserError(f"{where}: not a training-config field ({section} has: {', '.join(fields)})")
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if is_section and index == len(parts) - 1:
            raise UserError(f"{where}: a section, not a field (it has: {', '.join(annotation.model_fields)})")
        if not is_section and index < len(parts) - 1:
            raise UserError(f"{where}: {'.'.join(parts[:index + 1])} is not a section")
        model = annotation if is_section else model
    for reserved, reason in RESERVED_FIELDS.items():
        if path == reserved or path.startswith(f"{reserved}."):
            raise UserError(f"{where}: not searchable: {reason}")


def check_asha(sweep: Sweep) -> None:
    if sweep.config.asha.enabled and sweep.config.asha.grace_period > sweep.max_t:
        raise UserError(f"asha.grace_period: {sweep.config.asha.grace_period} is more than the trials' "
                        f"schedule.epochs ({sweep.max_t})")


def _apply_trial_resources(raw: dict, trial: TrialResources) -> None:
    if trial.num_workers is not None:
        set_value(raw, "scaling.num_workers", trial.num_workers, "trial.num_workers")
    if trial.gpus_per_worker is not None:
        scaling = raw.get("scaling") if isinstance(raw.get("scaling"), dict) else {}
        per_worker = {k: v for k, v in (scaling.get("resources_per_worker") or {"CPU": 1}).items() if k != "GPU"}
        set_value(raw, "scaling.use_gpu", trial.gpus_per_worker > 0, "trial.gpus_per_worker")
        set_value(raw, "scaling.resources_per_worker",
                  {**per_worker, **({"GPU": trial.gpus_per_worker} if trial.gpus_per_worker else {})},
                  "trial.gpus_per_worker")


def _leaves(mapping: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every non-mapping value of a nested mapping."""
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, f"{path}.")
        else:
            yield path, value


def _distribution_paths(mapping: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, distribution) where a distribution is a mapping with a `kind`."""
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and "kind" not in value:
            yield from _distribution_paths(value, f"{path}.")
        else:
            yield path, value
