"""What a checkpoint holds (every `Stateful` of the run, the resolved config, each rank's own
states: RNGs, a partial epoch's statistics), when one is due within an epoch, and its round trip
through Ray Train (`report`, uploaded in the background or not / `get_checkpoint`); the layout of a
checkpoint directory: docs/design/training.md.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointUploadMode
from torch.distributed.checkpoint.stateful import Stateful

STATE_NAME = "train_state.pt"
CONFIG_NAME = "config.json"
# The val_top1 of a checkpoint within an epoch: below any top-1. Not NaN: Ray Train's checkpoint
# manager snapshot stores it as null, and a driver that restores the snapshot cannot rank null.
WITHIN_EPOCH_SCORE = -1.0


@dataclass
class TrainProgress:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    mlflow_run_id: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)  # metrics of each completed epoch
    # Epoch `epoch` under way: the plan it is read with (`EpochPlan.state`) and the batches of it
    # already trained on (a mid-epoch checkpoint's position); None and 0 between epochs.
    epoch_plan: dict[str, Any] | None = None
    epoch_batches: int = 0
    resumes: list[dict[str, int]] = field(default_factory=list)  # where each restart went on: epoch, batch, step

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def complete_epoch(self, metrics: dict[str, float]) -> None:
        self.epoch += 1
        self.epoch_plan, self.epoch_batches = None, 0
        self.history.append(dict(metrics))

    def resumed(self) -> None:
        """Restored from a checkpoint: note where training goes on."""
        self.resumes.append({"epoch": self.epoch, "batch": self.epoch_batches, "step": self.step})


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


class CheckpointCadence:
    """When a checkpoint is due within an epoch: every `every_steps` optimizer steps, every
    `every_minutes` (rank 0's clock), and once when Ray Train reports that a node of the run is being
    preempted (asked every `preemption_check_steps` steps; 0: never). Every rank gets the same answer."""

    def __init__(self, every_steps: int | None, every_minutes: float | None, preemption_check_steps: int = 0):
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.preemption_check_steps = preemption_check_steps
        self.last = time.monotonic()
        self.preemption = None  # the notice a checkpoint was taken for

    def due(self, step: int, device: torch.device) -> str | None:
        """Why a checkpoint is due after optimizer step `step`, or None."""
        if self.every_steps and step % self.every_steps == 0:
            return f"every {self.every_steps} steps"
        if self.every_minutes is not None:
            late = torch.tensor([time.monotonic() - self.last >= 60 * self.every_minutes], device=device)
            if dist.is_initialized():
                dist.broadcast(late, src=0)
            if late.item():
                return f"every {self.every_minutes:g} minutes"
        if self.preemption_check_steps and step % self.preemption_check_steps == 0:
            notice = ray.train.get_preemption_info()  # the same on every rank (it is a collective)
            if notice is not None and self.preemption is None:
                self.preemption = notice
                return f"preemption of node(s) {', '.join(node[:8] for node in notice.preempted_node_ids)}"
        return None

    def done(self) -> None:
        """A checkpoint was just taken (within or at the end of an epoch)."""
        self.last = time.monotonic()


class Checkpointer:
    """Saves rank 0's `states` and the config once, and each rank's `rank_states`, into checkpoints
    that Ray Train uploads (`upload`: "async" in the background, "sync" before `report` returns).
    Restored by a group of another size, a rank state with `merge_state_dicts` is given every saved
    rank's state on rank 0 (and none elsewhere); the others are restored from the same rank's, if any."""

    def __init__(self, states: Mapping[str, Stateful], rank_states: Mapping[str, Stateful], rank: int,
                 config_json: str, upload: Literal["async", "sync"] = "async", world_size: int = 1):
        self.states, self.rank_states, self.rank, self.config_json = states, rank_states, rank, config_json
        self.upload, self.world_size = upload, world_size

    def save(self, directory: Path) -> None:
        if self.rank == 0:
            torch.save({name: state.state_dict() for name, state in self.states.items()}, directory / STATE_NAME)
            (directory / CONFIG_NAME).write_text(self.config_json)
        torch.save({name: state.state_dict() for name, state in self.rank_states.items()},
                   directory / _rank_name(self.rank))

    def load(self, directory: Path) -> None:
        saved = torch.load(directory / STATE_NAME, map_location="cpu", weights_only=False)
        for name, state in self.states.items():
            state.load_state_dict(saved[name])
        saved_ranks = sorted(directory.glob(_rank_name("*")))
        resized = len(saved_ranks) != self.world_size
        own = directory / _rank_name(self.rank)
        mine = torch.load(own, weights_only=False) if own.exists() else None  # none for a rank the run had not
        every = [torch.load(path, weights_only=False) for path in saved_ranks] if resized and self.rank == 0 else []
        for name, state in self.rank_states.items():
            if resized and hasattr(state, "merge_state_dicts"):
                state.merge_state_dicts([saved[name] for saved in every])
            elif mine is not None:
                state.load_state_dict(mine[name])

    def report(self, metrics: dict[str, float]) -> None:
        """`ray.train.report` with a checkpoint of now (every rank calls it: it is a barrier)."""
        if self.upload == "sync":
            with tempfile.TemporaryDirectory(prefix="vitae-checkpoint-") as directory:
                self.save(Path(directory))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
            return
        directory = tempfile.mkdtemp(prefix="vitae-checkpoint-")  # Ray Train deletes it once uploaded
        self.save(Path(directory))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC)

    def report_within_epoch(self, progress: TrainProgress, reason: str) -> None:
        """A mid-epoch checkpoint: no validation score (`WITHIN_EPOCH_SCORE`, below every epoch's in
        `num_to_keep`), and no `epoch` key (no epoch result to ASHA)."""
        self.report({"val_top1": WITHIN_EPOCH_SCORE, "step": progress.step, "epoch_batches": progress.epoch_batches,
                     "within_epoch": progress.epoch + 1, "reason": reason})

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


def _rank_name(rank: int | str) -> str:
    return f"rank{rank}.pt"
