"""Options of the registry jobs whose settings are flags (`promote`, `evaluate`), owned here: their
defaults and shared constants, typed and validated, read from `--config FILE` (YAML under the flags'
names) with the flags given overriding it. Light to import (no torch, ray or mlflow): the CLI's help
texts read the defaults here."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from infra.config_files import first_problem, read_yaml
from infra.errors import UserError

DEFAULT_SPLIT = "test"
DEFAULT_BATCH_SIZE = 64  # evaluation: images per forward pass
DEFAULT_LOADER_WORKERS = 2  # evaluation: DataLoader processes
METRICS = ("top1", "top5")  # what promotion may compare; higher is better
LOCK_BUCKET_ENV = "VITAE_CHECKPOINT_BUCKET"  # the promotion lease's bucket when --lock-url is not given
LOCK_PREFIX = "locks/registry"  # the lease of registered model NAME: <lock-url>/locks/registry/NAME


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromoteOptions(_Options):
    model: str = Field(min_length=1)  # the registered model's name
    version: PositiveInt | None = None  # None: the version aliased @challenger
    data: str | None = None  # None: the challenger version's dataset_url tag
    split: str = DEFAULT_SPLIT
    metric: Literal[METRICS] = "top1"
    margin: float = Field(0.0, ge=0.0)
    lock_url: str | None = None  # None: s3://$VITAE_CHECKPOINT_BUCKET
    rollback: bool = False


class EvaluateOptions(_Options):
    model: str = Field(min_length=1)  # an MLflow model URI
    data: str = Field(min_length=1)  # a prepared dataset
    split: str = DEFAULT_SPLIT
    output: str | None = None  # a directory or an s3:// prefix; None: evaluations/<model>-<split>
    batch_size: PositiveInt = DEFAULT_BATCH_SIZE
    loader_workers: int = Field(DEFAULT_LOADER_WORKERS, ge=0)


Options = TypeVar("Options", bound=_Options)


def resolve_options(args: argparse.Namespace, options: type[Options]) -> Options:
    """The file's values (if `--config`) overridden by the flags given, validated."""
    raw = read_yaml(Path(args.config)) if args.config else {}
    given = {name: value for name in options.model_fields if (value := getattr(args, name, None)) is not None}
    try:
        return options.model_validate({**raw, **given})
    except ValidationError as error:
        problem = error.errors()[0]
        if problem["type"] == "missing":
            name = problem["loc"][0]
            raise UserError(f"--{name.replace('_', '-')} is required (the flag, or `{name}:` in the --config file)"
                            ) from None
        source = f" (flags and {args.config})" if args.config else ""
        raise UserError(f"invalid options{source}: {first_problem(error)}") from None
