"""The parser of `vitae stack up|status|down` (handlers: `cluster.commands`)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DEFAULT_DIR = ".vitae"


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=Path(DEFAULT_DIR), help=f"stack directory (default {DEFAULT_DIR})")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 1024 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1024 to 65535, got {text!r}")
    return int(text)


def _snapshot_interval(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 60:
        raise argparse.ArgumentTypeError(f"expected seconds from 1 to 60, got {text!r}")
    return int(text)


def _bucket(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid S3 bucket name")
    return text


def add_stack_parser(subparsers: argparse._SubParsersAction) -> None:
    stack = subparsers.add_parser(
        "stack", help="run S3, MLflow and Ray locally (embedded stack)",
        description="The embedded local stack: a moto S3 server, an MLflow server and a Ray head, "
                    "as processes on 127.0.0.1 recorded in a stack directory.",
    )  # fmt: skip
    commands = stack.add_subparsers(dest="stack_command", metavar="COMMAND", required=True)

    up = commands.add_parser("up", help="start the services that are not running; write stack.env")
    _add_dir(up)
    up.add_argument("--num-cpus", type=_positive, metavar="N",
                    help="logical CPUs of the Ray head, may exceed the cores (default 8)")
    up.add_argument("--data-bucket", type=_bucket, metavar="NAME", help="bucket for datasets (default vitae-data)")
    up.add_argument("--checkpoint-bucket", type=_bucket, metavar="NAME",
                    help="bucket for Ray checkpoints (default vitae-checkpoints)")
    up.add_argument("--s3-port", type=_port, metavar="PORT", help="S3 server port (default: a free one)")
    up.add_argument("--mlflow-port", type=_port, metavar="PORT", help="MLflow server port (default: a free one)")
    up.add_argument("--ray-port", type=_port, metavar="PORT", help="Ray GCS port (default: a free one)")
    up.add_argument("--ray-dashboard-port", type=_port, metavar="PORT", dest="dashboard_port",
                    help="Ray dashboard and jobs API port (default: a free one)")
    up.add_argument("--s3-snapshot-interval", type=_snapshot_interval, metavar="SECONDS",
                    help="how often the S3 objects are written to disk when they changed; a killed S3 "
                         "server loses at most the writes of the last interval (default 30)")
    up.add_argument("--ray-auth", action=argparse.BooleanOptionalAction,
                    help="Ray token authentication (default: on)")  # fmt: skip
    up.set_defaults(handler="cluster.commands:stack_up")

    status = commands.add_parser("status", help="show each service, its address and health (exit 1 unless all healthy)")
    _add_dir(status)
    status.set_defaults(handler="cluster.commands:stack_status")

    down = commands.add_parser("down", help="stop exactly the processes the stack started")
    _add_dir(down)
    down.add_argument("--purge", action="store_true",
                      help="also delete the S3 objects (datasets, checkpoints) kept on disk")
    down.set_defaults(handler="cluster.commands:stack_down")
