"""One tuning job, described once: what every tuning function and every worker process receives.

The pipeline (`bench.pipeline`) runs it; `tune_losses`, `tune_in_workers`, `run_finals` and the widening
step all read their settings from it, so a setting added here reaches every one of them, and the worker
processes get it by pickling the job. What cannot travel to another process (the tracker, the dataset, the
log function) is passed beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import losses as loss_registry
from bench.config import ConfigError, Experiment
from bench.tune.study import GRACE_PERIOD, HEARTBEAT_INTERVAL


@dataclass(frozen=True)
class TuneJob:
    """Tune `losses` on `exp` in the studies of `storage` (default: the config's `tune.storage`).

    `timeout` (s): no trial starts after it. `study_name`: one loss's study under another name.
    `workers`: tuning processes on this machine (`bench.tune.workers`). `loss_modules`: --loss-module files
    that those processes load. `widen`: retune a loss whose best value hit an edge of its range over that
    range widened by this factor. `finals`: run the final seeds after tuning. The heartbeat settings and
    `poll_s` (how often a worker looks at studies whose last trials run elsewhere) are for tests.
    """

    exp: Experiment
    losses: Sequence[str]
    storage: str = ""
    device: str = "auto"
    timeout: float | None = None
    study_name: str | None = None
    workers: int = 1
    loss_modules: Sequence[str] = ()
    widen: float | None = None
    finals: bool = True
    heartbeat_interval: int = HEARTBEAT_INTERVAL
    grace_period: int = GRACE_PERIOD
    poll_s: float = 2.0

    def __post_init__(self) -> None:
        """Checks that need no data: a bad job fails before any dataset is read."""
        if self.study_name and len(self.losses) != 1:
            raise ConfigError("--study-name names one study: give exactly one loss with it")
        for loss in self.losses:
            loss_registry.get_spec(loss)  # an unknown name fails with the list of known ones
        object.__setattr__(self, "losses", tuple(self.losses))  # frozen: set once, here
        object.__setattr__(self, "loss_modules", tuple(self.loss_modules))
        object.__setattr__(self, "storage", self.storage or self.exp.tune.storage)
