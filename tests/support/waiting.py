"""Waiting on a condition with a bounded deadline, naming what did not happen."""

from __future__ import annotations

import time


def wait_for(condition, deadline_s: float, what: str, context=lambda: ""):
    """The first true value of `condition()`, asked every 0.1 s for up to `deadline_s`."""
    deadline = time.monotonic() + deadline_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} within {deadline_s:.0f}s; {context()}"
        time.sleep(0.1)
    return value
