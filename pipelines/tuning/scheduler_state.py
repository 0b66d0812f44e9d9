"""ASHA's rungs in the sweep's experiment checkpoint: a Tune callback whose state is the scheduler's
own `save` file, so `Tuner.restore` restores the rungs together with the trials (Tune's experiment
state leaves the scheduler out). Why and what a resume keeps: docs/design/sweeps.md.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ray.tune import Callback
from ray.tune.schedulers import TrialScheduler

SAVED_FILE = "scheduler.pkl"


class SchedulerState(Callback):
    """Tune saves this callback's state with every experiment checkpoint (periodically and when the
    sweep stops) and hands it back on `Tuner.restore`, before any trial runs again."""

    def __init__(self, scheduler: TrialScheduler):
        self.scheduler = scheduler  # the TuneConfig's own: pickled with it into tuner.pkl, one object

    def get_state(self) -> dict[str, bytes]:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory, SAVED_FILE)
            self.scheduler.save(str(path))
            return {"scheduler": path.read_bytes()}

    def set_state(self, state: dict[str, bytes]) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory, SAVED_FILE)
            path.write_bytes(state["scheduler"])
            self.scheduler.restore(str(path))
