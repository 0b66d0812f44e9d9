"""What a training run prints on its console: our per-epoch lines and Ray's errors, not Ray's chatter
(per-rank "Reporting training result" lines, the core worker's error line about the preemption
watcher's restartable arguments); why: docs/design/training.md.
"""

from __future__ import annotations

import logging
import os

# Ray's driver leaves out the forwarded log lines that match (read once, when the driver imports Ray)
DRIVER_SETTINGS = {
    "RAY_DEDUP_LOGS_SKIP_REGEX": r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments",
}


def quiet_driver() -> None:
    """In a process that may drive a training run, before it imports Ray: `DRIVER_SETTINGS`, unless
    the user set them."""
    for key, value in DRIVER_SETTINGS.items():
        os.environ.setdefault(key, value)


def quiet_worker() -> None:
    """In each Ray Train worker, once Ray Train has set up its logging."""
    from ray.train.v2._internal.execution import context  # its logger is named by its file's path

    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # "Reporting training result" per rank
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)  # "Found credentials" per client
