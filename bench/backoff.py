"""Retrying a call that waits on a server: doubling delays while the server does not answer, then giving up.

The MLflow tracker (reads and new runs) and the Optuna storage (every call) wait out a restart the same way;
each says what "no answer" means for it and what giving up raises.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def with_backoff(
    call: Callable[[], T],
    *,
    transient: Callable[[BaseException], bool],
    seconds: float,
    first_delay: float,
    max_delay: float,
    give_up: Callable[[BaseException], BaseException],
) -> T:
    """`call()`, retried after first_delay, 2 x first_delay, ... (at most max_delay) while its error is
    `transient`, for up to `seconds`; then `give_up(last error)` is raised from it. Other errors pass."""
    deadline, delay = time.monotonic() + seconds, first_delay
    while True:
        try:
            return call()
        except Exception as error:
            if not transient(error):
                raise
            if time.monotonic() + delay > deadline:
                raise give_up(error) from error
            time.sleep(delay)
            delay = min(2 * delay, max_delay)
