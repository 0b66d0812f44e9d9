"""What a training run prints on its console: our per-epoch lines and Ray's errors, not Ray Train's
chatter (per-rank "Reporting training result" lines, the preemption watcher's error line); why:
docs/design/training.md.
"""

from __future__ import annotations

import logging
import os

from ray.train.v2._internal.execution import context

RAY_TRAIN_SETTINGS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def quiet_driver() -> None:
    """In the process that calls `TorchTrainer.fit()`: Ray Train's settings, unless the user set them."""
    for key, value in RAY_TRAIN_SETTINGS.items():
        os.environ.setdefault(key, value)


def quiet_worker() -> None:
    """In each Ray Train worker, once Ray Train has set up its logging."""
    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # "Reporting training result" per rank
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)  # "Found credentials" per client
