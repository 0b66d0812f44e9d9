"""What the benchmarks run against: generated images; a real moto S3 server, alone or within the
embedded stack (`cluster.stack`: S3 server, `mlflow server` and Ray head) in a temporary directory,
on free loopback ports, stopped when the benchmark ends."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from cluster.ray_head import disconnect_driver, ray_temp_dir
from cluster.s3_server import REGION, create_buckets, start_s3_server
from cluster.stack import Stack

BENCHMARK_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "benchmark", "AWS_SECRET_ACCESS_KEY": "benchmark"}


def generate_jpegs(root: Path, count: int, side: int, classes: int = 10) -> None:
    """Smooth random colour fields (JPEG-friendly, like photos), `count` over `classes` folders."""
    for index in range(count):
        folder = root / f"class_{index % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        noise = np.random.default_rng(index).integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
        image = Image.fromarray(noise).resize((side, side), Image.Resampling.BILINEAR)
        image.save(folder / f"img_{index:06d}.jpg", quality=90)


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """SIGTERM (from `timeout`, say) ends this process through its `finally` blocks, which stop the
    services it started, instead of killing it on the spot. Before they run, the handler PyTorch's
    DataLoader sets for SIGCHLD is removed: DataLoader workers killed by the same signal (`timeout`
    signals the whole process group) would otherwise raise into the teardown and cut it short."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def s3_server(bucket: str) -> Iterator[str]:
    """A moto S3 server with `bucket`; this process's S3 settings point at it. Yields the endpoint."""
    server = start_s3_server()
    try:
        with exit_on_sigterm():
            os.environ.update(AWS_ENDPOINT_URL_S3=server.endpoint, AWS_DEFAULT_REGION=REGION, **BENCHMARK_CREDENTIALS)
            create_buckets(server.endpoint, [bucket], *BENCHMARK_CREDENTIALS.values())
            yield server.endpoint
    finally:
        server.stop()


@contextlib.contextmanager
def embedded_stack(directory: Path, num_cpus: int = 8) -> Iterator[dict[str, str]]:
    """The embedded stack in `directory` (buckets `vitae-data`, `vitae-checkpoints`); this process's
    environment points at it (S3, MLflow, Ray with token authentication) and the addresses are
    yielded. Ray reads its authentication settings when first imported: import it only inside."""
    if "ray" in sys.modules:
        raise RuntimeError("ray was imported before the stack's Ray settings were in the environment")
    stack = Stack(directory)
    try:
        with exit_on_sigterm():
            print("starting the embedded stack (S3, MLflow, Ray head) ...", flush=True)
            stack.up({"num_cpus": num_cpus})
            yield stack.use_in_this_process()
    finally:
        disconnect_driver()
        stack.down()
        shutil.rmtree(ray_temp_dir(directory), ignore_errors=True)
