"""The `vitae` command line: parsers (`jobs`, `data`, `stack`) and dispatch. Each subcommand names
its handler as "module:function"; the module is imported only when that subcommand runs, so that
`vitae --help` stays fast while the jobs import what they need at their top."""

from __future__ import annotations

import argparse
import importlib
import sys

from infra.errors import INTERRUPTED_EXIT, USER_ERROR_EXIT, UserError
from pipelines.cli import data, jobs, stack
from pipelines.training.ray_logging import quiet_driver

PARSERS = (jobs.add_models_parser, jobs.add_train_parser, jobs.add_tune_parser, jobs.add_evaluate_parser,
           jobs.add_predict_parser, jobs.add_promote_parser, jobs.add_register_parser, jobs.add_export_parser,
           jobs.add_quickstart_parser,
           data.add_prep_parsers, stack.add_stack_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitae",
        description="Train ViTAE vision transformers on Ray and ship the best model through MLflow.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in PARSERS:
        add_parser(subparsers)
    return parser


def run_handler(args: argparse.Namespace) -> int:
    module, _, function = args.handler.partition(":")
    return getattr(importlib.import_module(module), function)(args) or 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_driver()  # before a handler imports Ray
    try:
        return run_handler(args)
    except UserError as error:
        print(f"vitae: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("vitae: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
