"""What every `bench` command shares: its result written as JSON (`--json PATH`) and a limit on its time
(`--timeout SECONDS`), so that `bench gpu-check` can run each one as a stage and read its figures."""

from __future__ import annotations

import json
import math
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd


class BenchTimeout(Exception):
    """A bench command ran past its `--timeout`."""


def plain(value: Any) -> Any:
    """`value` as JSON-ready data: tables as lists of rows, NaN as None, numpy scalars as Python ones."""
    if isinstance(value, pd.DataFrame):
        return [plain(row) for row in value.to_dict(orient="records")]
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if hasattr(value, "item") and not isinstance(value, str):  # numpy and torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | None, result: Any) -> None:
    """Write `result` to `path` (nothing when None), its folder made if need be."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(plain(result), indent=1))


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise BenchTimeout in the main thread after `seconds` (no limit when None): subprocess.run kills its
    child on the way out, so a case in flight ends with it."""
    if seconds is None:
        yield
        return

    def expire(signum, frame):
        raise BenchTimeout(f"bench: stopped after --timeout {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
