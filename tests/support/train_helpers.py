"""Shared by the training tests: small generated datasets and configs for a tiny model, the
`ray job` CLI that submits them, and an MLflow server of a test's own that it can stop and start."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

import yaml
from PIL import Image, ImageDraw

from cluster.mlflow_server import start_mlflow_server
from cluster.net import free_port
from infra import object_store
from data_prep.prep import PrepOptions, prepare
from data_prep.sources import SourceOptions

COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230))
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the prefixes of forwarded lines
FORWARDED = re.compile(r"^\s*\([\w.:-]+ pid=\d+")  # `(RayTrainWorker pid=123, ip=...)`


def shape_image(label: int, index: int, size: tuple[int, int]) -> bytes:
    """A coloured shape per class on a dark background, placed and sized by `index`."""
    image = Image.new("RGB", size, (20 + index % 7, 20, 30))
    draw = ImageDraw.Draw(image)
    width, height = size
    left, top = index % (width // 3), (index * 3) % (height // 3)
    box = (left, top, left + width // 2, top + height // 2)
    [draw.rectangle, draw.ellipse, draw.polygon][label](
        box if label < 2 else [(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])],
        fill=COLOURS[label])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_shapes_folder(root: Path, per_class: int) -> Path:
    """root/<class>/<n>.png for three classes, in assorted sizes and aspect ratios."""
    for label, name in enumerate(("square", "disc", "triangle")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            size = (24 + index % 3 * 8, 20 + index % 4 * 6)
            (root / name / f"{index}.png").write_bytes(shape_image(label, index, size))
    return root


def prepare_dataset(source: str, dest: str, shard_max_samples: int, digits_size: int = 16) -> str:
    prepare(source, dest, PrepOptions(shard_max_samples=shard_max_samples, workers=2,
                                      source=SourceOptions(digits_size=digits_size)), progress=False)
    return dest


def tiny_config(run_name: str, data_url: str, storage_path: str, **sections) -> dict:
    """A 2-worker CPU run of a one-cell vitae_t at 16 px; `sections` update the defaults."""
    config = {
        "name": run_name,
        "data": {"url": data_url, "batch_size": 32, "loader_workers": 1, "shuffle_buffer": 200, "crop_pct": 1.0,
                 "interpolation": "bilinear", "augment": {"scale": [0.7, 1.0], "hflip": 0.0}},
        "model": {"name": "vitae_t", "img_size": 16, "depth": 1, "drop_path_rate": 0.0},
        "optim": {"lr": 1.6e-2, "ema_decay": 0.9},
        "schedule": {"epochs": 3, "warmup_epochs": 0.5},
        "checkpoint": {"storage_path": storage_path, "num_to_keep": 2, "max_failures": 1},
        "mlflow": {"experiment": "vitae-tests"},
        "scaling": {"num_workers": 2},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    return config


def unit_config(**sections) -> dict:
    """`tiny_config` of a unit test that never reaches its (made-up) dataset and storage."""
    return tiny_config("unit", "s3://data/set", "s3://checkpoints/runs", **sections)


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def ray_job(*args: str, check: bool = True, cwd: Path | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real `ray job` CLI (RAY_API_SERVER_ADDRESS and the token come from `env`, by default the
    environment), run in `cwd` (where `--working-dir .` and `--runtime-env FILE` are read)."""
    done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", *args],
                          capture_output=True, text=True, timeout=480, cwd=cwd, env=env)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def checkpointed_epoch(storage_url: str, run_name: str) -> int:
    """The completed epochs of run `run_name`'s latest checkpoint registered by Ray Train (0 if none)."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    location = object_store.parse_s3_url(storage_url)
    store = object_store.shared_store(location.bucket)
    key = f"{location.key}/{run_name}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}"
    for _ in range(50):
        if store.head(key) is None:
            return 0
        try:
            latest = json.loads(store.get_bytes(key))["latest_checkpoint_result"]
        except json.JSONDecodeError:  # a read racing Ray's rewrite came back torn from moto (seen under load)
            time.sleep(0.1)
            continue
        if not latest:
            return 0
        metrics = latest["metrics"]  # a checkpoint within epoch E has no "epoch": E - 1 are complete
        return int(metrics["epoch"]) if "epoch" in metrics else int(metrics["within_epoch"]) - 1
    raise AssertionError(f"{key} stayed unreadable (torn JSON) for 50 reads")


def wait_for_checkpoint(storage_url: str, run_name: str, epoch: int, timeout_s: float, submission_id: str) -> bool:
    """Whether the run checkpointed `epoch` within `timeout_s`; False at once if the job ended first."""
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient()
    deadline = time.monotonic() + timeout_s
    while checkpointed_epoch(storage_url, run_name) < epoch:
        if time.monotonic() > deadline or jobs.get_job_status(submission_id).is_terminal():
            return False
        time.sleep(0.5)
    return True


def job_report(submission_id: str) -> str:
    """The job's status and the end of its logs, for an assertion message."""
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient().get_job_info(submission_id)
    return f"job {submission_id} {info.status}: {info.message}\n{ray_job('logs', submission_id).stdout[-6000:]}"


def train_worker_pids(job_id: str, alive_only: bool = True) -> set[int]:
    """The Ray Train worker processes of Ray job `job_id`, living or (`alive_only=False`) ever started
    (the state API of the session head)."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker"), *([("state", "=", "ALIVE")] if alive_only else [])]
    actors = list_actors(address=os.environ["RAY_API_SERVER_ADDRESS"], filters=filters, limit=10_000)
    return {int(actor.pid) for actor in actors if actor.job_id == job_id}


def driver_lines(logs: str) -> list[str]:
    """The lines of a job's logs that its driver wrote (not forwarded from a Ray process, which Ray
    prefixes with `(Name pid=...)`), colour codes removed."""
    plain = (ANSI_COLOUR.sub("", line) for line in logs.splitlines())
    return [line for line in plain if line.strip() and not FORWARDED.match(line)]


def train_entrypoint(config_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.train", "--config", str(config_path),
            *(part for item in overrides for part in ("--set", item))]


class OwnMlflowServer:
    """A test's own MLflow server, stopped and started again on the same port and files (the
    session's is shared by the whole suite and must stay up)."""

    def __init__(self, home: Path):
        self.home, self.port = home, free_port()
        self.start()

    def start(self) -> None:
        self.server = start_mlflow_server(self.home / "mlflow", self.port, self.home / "mlflow.log")

    def stop(self) -> None:
        self.server.stop()


def all_reduce_totals(rank: int, init_file: str, parts: list, num_classes: int, out: str) -> None:
    """A gloo rank of `parts` (logits, labels) per rank: all-reduces its totals; rank 0 saves them."""
    import torch
    import torch.distributed as dist

    from pipelines.training.validation import EvalTotals

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=len(parts))
    logits, labels = parts[rank]
    totals = EvalTotals.zeros(num_classes)
    if len(labels):
        totals.add_batch(logits, labels)
    reduced = totals.all_reduced(torch.device("cpu"))
    if rank == 0:
        torch.save(reduced, out)
    dist.destroy_process_group()
