"""The `vitae` command line: one entry point that dispatches to each package's subcommands.

Each module in `COMMAND_MODULES` exposes `register(subparsers)`, adding its subcommands with
`set_defaults(handler=...)`. Those modules keep heavy imports (torch, ray, mlflow) inside their
handlers so that `vitae --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from infra.errors import UserError

COMMAND_MODULES = (
    "pipelines.cli.model_table",
    "pipelines.training.driver",
    "pipelines.tuning.driver",
    "pipelines.model_registry.evaluation",
    "pipelines.model_registry.prediction",
    "pipelines.model_registry.promotion",
    "pipelines.model_registry.registration",
    "pipelines.quickstart",
    "data_prep.cli",
    "cluster.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitae",
        description="Train ViTAE vision transformers on Ray and ship the best model through MLflow.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except UserError as error:
        print(f"vitae: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitae: interrupted", file=sys.stderr)
        return 130

