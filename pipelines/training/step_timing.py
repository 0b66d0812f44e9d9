"""Where the time of training steps goes: seconds per phase (forward, backward, optimiser), summed
over an epoch; timed by CUDA events on a GPU (docs/design/training.md).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch


class PhaseTimer:
    def __init__(self, device: torch.device):
        self._on_gpu = device.type == "cuda"
        self._seconds: dict[str, float] = defaultdict(float)
        self._gpu_intervals: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._last = None

    def start(self) -> None:
        """A step starts here (after its batch arrived)."""
        self._last = self._mark()

    def lap(self, phase: str) -> None:
        """`phase` ends here; the next one starts."""
        now = self._mark()
        if self._on_gpu:
            self._gpu_intervals.append((phase, self._last, now))
        else:
            self._seconds[phase] += now - self._last
        self._last = now

    def seconds(self, phase: str) -> float:
        """Total time of `phase` so far (on a GPU this waits for the recorded work to finish)."""
        if self._gpu_intervals:
            self._gpu_intervals[-1][2].synchronize()
            for name, begin, end in self._gpu_intervals:
                self._seconds[name] += begin.elapsed_time(end) / 1000
            self._gpu_intervals.clear()
        return self._seconds[phase]

    def _mark(self):
        if not self._on_gpu:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
