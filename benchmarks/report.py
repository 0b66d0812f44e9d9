"""Shared by the benchmarks: timing, best-of-rounds measurement and the table each one prints, whose
last line is the headline."""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence, TypeVar

Result = TypeVar("Result")


def timed(function: Callable[[], Result]) -> tuple[float, Result]:
    """(seconds `function` took, what it returned)."""
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def best_of_rounds(measures: dict[str, Callable[[], Result]], rounds: int, score: Callable[[Result], float]
                   ) -> dict[str, Result]:
    """Each measure run `rounds` times, the measures alternating within a round; per measure, the
    result with the highest `score`. Alternating and keeping the best keeps load from other
    processes on a shared machine from deciding a comparison."""
    results: dict[str, list[Result]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            results[name].append(measure())
    return {name: max(values, key=score) for name, values in results.items()}


def print_table(title: str, rows: Sequence[Sequence[str]], headline: str, notes: Sequence[str] = ()) -> None:
    """`title`, then `rows` (the first is the header) in aligned columns (the first left-aligned,
    the others right-aligned), then `notes` and the machine's load, then `headline: ...` as the last
    line."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    print(title)
    for row in rows:
        cells = [cell.ljust(width) if column == 0 else cell.rjust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())
    for note in notes:
        print(note)
    print(f"load average at the end (1 / 5 / 15 min): {' / '.join(f'{load:.1f}' for load in os.getloadavg())} "
          f"on {os.cpu_count()} cores")
    print(f"headline: {headline}", flush=True)
