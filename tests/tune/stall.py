"""A trial that hangs after its first epoch until its worker is killed.

A test that kills a worker "mid-trial" after a guessed delay, or when a poll happens to see a RUNNING trial,
races the worker: on a busy machine the trial may end before the kill lands. Here the worker itself says when
it is mid-trial (it writes the marker file) and then waits, so the kill always lands inside that trial.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

STALL_S = 900.0  # a stalled worker nobody kills (its test failed) ends by itself after this long


def stall_trials_from(number: int, marker: Path) -> None:
    """From now on in this process: the first trial numbered `number` or above to finish its first epoch
    (in any worker sharing `marker`) writes `<pid> <trial number>` to `marker` and hangs, its heartbeats
    still going; every other trial runs as usual."""
    from bench.tune import objective

    report_value = objective.report_value

    def report_then_stall(trial, value: float, step: int, last: bool) -> None:
        report_value(trial, value, step, last)
        if trial.number >= number and _claim(marker, trial.number):
            threading.Event().wait(STALL_S)
            raise RuntimeError(f"trial {trial.number} stalled for {STALL_S:.0f} s and nobody killed it")

    objective.report_value = report_then_stall


def _claim(marker: Path, number: int) -> bool:
    """Whether this process wrote `marker` (at most one does): its text appears whole or not at all."""
    if marker.exists():
        return False
    draft = marker.with_name(f"{marker.name}.{os.getpid()}")
    draft.write_text(f"{os.getpid()} {number}\n")
    try:
        os.link(draft, marker)
        return True
    except FileExistsError:
        return False
    finally:
        draft.unlink()


def stalled(marker: Path) -> tuple[int, int] | None:
    """(pid, trial number) of the worker whose trial stalled, once one has."""
    if not marker.exists():
        return None
    pid, number = marker.read_text().split()
    return int(pid), int(number)
