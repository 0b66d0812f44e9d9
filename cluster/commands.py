"""The handlers of `vitae stack up|status|down` (their parser: `pipelines.cli.stack`). Only
addresses and PIDs are printed; credentials stay in the stack's stack.env."""

from __future__ import annotations

import argparse
import time

from cluster.stack import ObjectsOnDisk, Stack


def _print_services(statuses) -> None:
    for status in statuses:
        pid = f"pid {status.pid}" if status.pid else ""
        print(f"  {status.name:<7} {status.state:<11} {status.address:<58} {pid}")


def _describe_objects(objects: ObjectsOnDisk) -> str:
    if objects.size is None:
        return f"S3 objects: {objects.path} (no snapshot yet)"
    written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(objects.written))
    return f"S3 objects: {objects.path} ({objects.size / 1e6:.1f} MB, snapshot of {written})"


def stack_up(args: argparse.Namespace) -> int:
    stack = Stack(args.dir)
    requested = {
        key: getattr(args, key)
        for key in ("num_cpus", "data_bucket", "checkpoint_bucket", "s3_port", "mlflow_port", "ray_port",
                    "dashboard_port", "ray_auth", "s3_snapshot_interval")
    }  # fmt: skip
    print(f"vitae stack in {stack.directory}: starting what is not running (Ray takes ~20 s)", flush=True)
    statuses = stack.up(requested)
    settings = stack.load().settings
    _print_services(statuses)
    print(f"buckets: {settings.data_bucket}, {settings.checkpoint_bucket}; their objects are kept in "
          f"{stack.s3_snapshot} (a snapshot every {settings.s3_snapshot_interval} s when changed, and at `down`)")
    auth = "token (RAY_AUTH_MODE=token, token in stack.env)" if settings.ray_auth else "disabled"
    print(f"Ray authentication: {auth}; logs in {stack.logs}")
    print(f"Use it:  source {stack.env_path}")
    return 0


def stack_status(args: argparse.Namespace) -> int:
    stack = Stack(args.dir)
    statuses = stack.status()
    print(f"vitae stack in {stack.directory}")
    _print_services(statuses)
    print(_describe_objects(stack.objects_on_disk()))
    return 0 if all(status.state == "healthy" for status in statuses) else 1


def stack_down(args: argparse.Namespace) -> int:
    stack = Stack(args.dir)
    statuses = stack.down(purge=args.purge)
    if not statuses:
        print(f"no stack in {stack.directory}; nothing to stop")
    for status in statuses:
        pid = f" (pid {status.pid})" if status.pid else ""
        print(f"{status.name}: {status.state}{pid}")
    if statuses and args.purge:
        print(f"S3 objects deleted ({stack.s3_snapshot})")
    elif statuses:
        objects = stack.objects_on_disk()
        print(_describe_objects(objects) + ("; `vitae stack down --purge` deletes them" if objects.size else ""))
    return 0
