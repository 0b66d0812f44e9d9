"""`vitae stack up|status|down`: the embedded local stack from the command line.

Only addresses and PIDs are printed; credentials stay in the stack's stack.env. The stack code
(and with it boto3) is imported inside the handlers.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DEFAULT_DIR = ".vitae"


def register(subparsers: argparse._SubParsersAction) -> None:
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
    up.add_argument("--ray-auth", action=argparse.BooleanOptionalAction,
                    help="Ray token authentication (default: on)")  # fmt: skip
    up.set_defaults(handler=stack_up)

    status = commands.add_parser("status", help="show each service, its address and health (exit 1 unless all healthy)")
    _add_dir(status)
    status.set_defaults(handler=stack_status)

    down = commands.add_parser("down", help="stop exactly the processes the stack started")
    _add_dir(down)
    down.set_defaults(handler=stack_down)


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


def _bucket(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid S3 bucket name")
    return text


def _print_services(statuses) -> None:
    for status in statuses:
        pid = f"pid {status.pid}" if status.pid else ""
        print(f"  {status.name:<7} {status.state:<11} {status.address:<58} {pid}")


def stack_up(args: argparse.Namespace) -> int:
    from cluster.stack import Stack

    stack = Stack(args.dir)
    requested = {
        key: getattr(args, key)
        for key in ("num_cpus", "data_bucket", "checkpoint_bucket", "s3_port", "mlflow_port", "ray_port",
                    "dashboard_port", "ray_auth")
    }  # fmt: skip
    print(f"vitae stack in {stack.directory}: starting what is not running (Ray takes ~20 s)", flush=True)
    statuses = stack.up(requested)
    settings = stack.load().settings
    _print_services(statuses)
    print(f"buckets: {settings.data_bucket}, {settings.checkpoint_bucket} (in memory: lost when S3 stops)")
    auth = "token (RAY_AUTH_MODE=token, token in stack.env)" if settings.ray_auth else "disabled"
    print(f"Ray authentication: {auth}; logs in {stack.logs}")
    print(f"Use it:  source {stack.env_path}")
    return 0


def stack_status(args: argparse.Namespace) -> int:
    from cluster.stack import Stack

    stack = Stack(args.dir)
    statuses = stack.status()
    print(f"vitae stack in {stack.directory}")
    _print_services(statuses)
    return 0 if all(status.state == "healthy" for status in statuses) else 1


def stack_down(args: argparse.Namespace) -> int:
    from cluster.stack import Stack

    stack = Stack(args.dir)
    statuses = stack.down()
    if not statuses:
        print(f"no stack in {stack.directory}; nothing to stop")
    for status in statuses:
        pid = f" (pid {status.pid})" if status.pid else ""
        print(f"{status.name}: {status.state}{pid}")
    return 0
