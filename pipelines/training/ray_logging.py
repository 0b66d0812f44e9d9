"""What a training run prints on its console, owned here: our per-epoch lines and Ray's errors, not
Ray Train's chatter. Two sources flooded it:

- every rank logs `Reporting training result N: TrainingReport(...every metric...)` at INFO on each
  `ray.train.report` (ray/train/v2/_internal/execution/context.py). Its logger is named by that
  file's path, so Ray Train's `LoggingConfig` (which filters loggers under `ray.train`) does not
  reach it: each worker sets that logger's level (`quiet_worker`).
- Ray Train starts a preemption watcher actor with every worker group, and Ray's core worker logs
  an error line about the actor's restartable constructor arguments. This project reads no
  preemption info (`ray.train.get_preemption_info`), and a preempted worker is still charged to
  Ray Train's preemption budget without it: the driver turns the watcher off with Ray Train's own
  setting, which Ray Train passes from the driver to its controller (`quiet_driver`). A user's
  own setting of `RAY_TRAIN_ENABLE_PREEMPTION_WATCHER` wins.
"""

from __future__ import annotations

import logging
import os

RAY_TRAIN_SETTINGS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def quiet_driver() -> None:
    """In the process that calls `TorchTrainer.fit()`: Ray Train's settings, unless the user set them."""
    for key, value in RAY_TRAIN_SETTINGS.items():
        os.environ.setdefault(key, value)


def quiet_worker() -> None:
    """In each Ray Train worker, once Ray Train has set up its logging."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # "Reporting training result" per rank
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)  # "Found credentials" per client
