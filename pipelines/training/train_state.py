"""What a checkpoint holds (every `Stateful` of the run, the resolved config, each rank's RNG
states) and its round trip through Ray Train (`report` / `get_checkpoint`); the layout of a
checkpoint directory: docs/design/training.md.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import ray.train
import torch
from torch.distributed.checkpoint.stateful import Stateful

STATE_NAME = "train_state.pt"
CONFIG_NAME = "config.json"


@dataclass
class TrainProgress:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    mlflow_run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # metrics of each completed epoch

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def complete_epoch(self, metrics: dict[str, float]) -> None:
        self.epoch += 1
        self.history.append(dict(metrics))


class RngState:
    """This process's generators: Python's, torch's (CPU and CUDA) and a private `random.Random`."""

    def __init__(self, private: random.Random):
        self.private = private

    def state_dict(self) -> dict[str, Any]:
        return {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "private": self.private.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        self.private.setstate(state["private"])


class Checkpointer:
    def __init__(self, states: Mapping[str, Stateful], rng: RngState, rank: int, config_json: str):
        self.states, self.rng, self.rank, self.config_json = states, rng, rank, config_json

    def save(self, directory: Path) -> None:
        if self.rank == 0:
            torch.save({name: state.state_dict() for name, state in self.states.items()}, directory / STATE_NAME)
            (directory / CONFIG_NAME).write_text(self.config_json)
        torch.save(self.rng.state_dict(), directory / _rng_name(self.rank))

    def load(self, directory: Path) -> None:
        saved = torch.load(directory / STATE_NAME, map_location="cpu", weights_only=False)
        for name, state in self.states.items():
            state.load_state_dict(saved[name])
        rng_path = directory / _rng_name(self.rank)
        if rng_path.exists():
            self.rng.load_state_dict(torch.load(rng_path, weights_only=False))

    def report(self, metrics: dict[str, float]) -> None:
        """`ray.train.report` with this epoch's checkpoint (every rank calls it: it is a barrier)."""
        with tempfile.TemporaryDirectory(prefix="vitae-checkpoint-") as directory:
            self.save(Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def restore_latest(self) -> bool:
        """Load the run's latest checkpoint if Ray Train has one (a resumed or restarted run)."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as directory:
            self.load(Path(directory))
        return True


def read_checkpoint_config(checkpoint) -> dict[str, Any]:
    """The resolved config stored in a `ray.train.Checkpoint`, read without downloading the rest."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{CONFIG_NAME}") as stream:
        return json.loads(stream.read())


def _rng_name(rank: int) -> str:
    return f"rng-rank{rank}.pt"
