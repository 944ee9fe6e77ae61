"""A loss's Optuna study: created once, audited on every later open, counted from the storage.

Optuna only: nothing here knows about MLflow or training. A study lives in an RDB storage with heartbeats, so
a worker killed mid-trial leaves a trial that the next worker marks FAIL once its heartbeat is stale.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from bench import layout
from bench.config import ConfigError, Experiment
from bench.tracking import redact
from bench.tune.sampler import make_pruner, make_sampler
from bench.tune.space import describe_space, recipe_fingerprint

HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 60  # a RUNNING trial without a heartbeat for this long belongs to a dead worker
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
OBJECTIVE = "val/map_at_r"


def study_name(experiment: str, loss: str) -> str:
    return f"{experiment}-{loss}"


def open_storage(
    url: str, heartbeat_interval: int = HEARTBEAT_INTERVAL, grace_period: int = GRACE_PERIOD
) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; SQLite waits for locks (several local workers) instead of failing."""
    engine_kwargs: dict[str, Any] = {}
    if layout.sqlite_path(url) is not None:
        layout.make_sqlite_folder(url)
        engine_kwargs = {"connect_args": {"timeout": 120}}
    last_error: Exception | None = None
    for attempt in range(5):  # two workers creating the schema at once: the loser retries and finds it
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                )
        except Exception as error:  # sqlalchemy's OperationalError / IntegrityError during table creation
            last_error = error
            time.sleep(0.5 * (attempt + 1))
    raise RuntimeError(f"cannot open Optuna storage {redact(url)}: {last_error}") from last_error


@dataclass
class StudySummary:
    loss: str
    study: str
    budget: int
    complete: int
    pruned: int
    failed: int
    best_value: float | None
    best_overrides: dict[str, Any] = field(default_factory=dict)
    best_trial: int | None = None

    @property
    def done(self) -> bool:
        return self.complete + self.pruned >= self.budget


class LossStudy:
    """One loss's study: created by the first worker, loaded and audited by every later one.

    A study continued with another search space or other fixed settings (data, model, epochs, ...) would mix
    trials that are not comparable, so opening it is refused; the budget alone may change.
    """

    def __init__(
        self,
        exp: Experiment,
        storage: optuna.storages.RDBStorage,
        name: str | None = None,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        """`exp` is the trial recipe (its `train.epochs` the trials' epochs); `pruner` replaces `tune.pruner`'s."""
        self.exp = exp
        self.loss = exp.loss.name
        self.name = name or study_name(exp.name, self.loss)
        self.budget = exp.tune.trials
        self.steps = exp.tune.cv_folds if exp.tune.cv_folds > 1 else exp.train.epochs
        self.space = describe_space(exp)
        sampler = make_sampler(exp.tune.sampler_seed, self.budget)
        pruner = pruner or make_pruner(exp.tune.pruner, self.budget, self.steps)
        try:
            self.study = optuna.create_study(
                storage=storage, study_name=self.name, direction="maximize", sampler=sampler, pruner=pruner
            )
            self.created = True
        except optuna.exceptions.DuplicatedStudyError:
            self.study = optuna.load_study(
                study_name=self.name, storage=storage, sampler=sampler, pruner=pruner
            )
            self.created = False
        self._record_setup()

    def _record_setup(self) -> None:
        attrs = self.study.user_attrs
        stored = attrs.get("search_space")
        if not self.created and stored is not None and stored != self.space:
            raise ConfigError(
                f"study {self.name!r} in this storage was tuned over a different search space "
                f"({sorted(stored)} vs {sorted(self.space)}); pass another --study-name or delete the study"
            )
        recipe = recipe_fingerprint(self.exp, self.space)
        if not self.created and attrs.get("recipe") not in (None, recipe):
            raise ConfigError(
                f"study {self.name!r} in this storage was tuned with other fixed settings (data, model, epochs, "
                "...); its trials would not be comparable: pass another --study-name or delete the study"
            )
        for key, value in {**self.setup(), "recipe": recipe}.items():
            if attrs.get(key) != value:
                self.study.set_user_attr(key, value)

    def setup(self) -> dict[str, Any]:
        """What the study was run with, stored with it so budgets and spaces can be audited."""
        return {
            "loss": self.loss,
            "experiment": self.exp.name,
            "budget": self.budget,
            "search_space": self.space,
            "sampler": "TPE",
            "sampler_seed": self.exp.tune.sampler_seed,
            "pruner": self.exp.tune.pruner,
            "epochs": self.exp.train.epochs,
            "cv_folds": self.exp.tune.cv_folds,
        }

    def trials(self, states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states)

    def counts(self) -> dict[TrialState, int]:
        trials = self.trials()
        return {state: sum(t.state == state for t in trials) for state in TrialState}

    def summary(self) -> StudySummary:
        counts = self.counts()
        complete = self.trials((TrialState.COMPLETE,))
        best = max(complete, key=lambda t: t.value) if complete else None
        return StudySummary(
            self.loss,
            self.name,
            self.budget,
            counts[TrialState.COMPLETE],
            counts[TrialState.PRUNED],
            counts[TrialState.FAIL],
            best.value if best else None,
            dict(best.user_attrs.get("overrides", {})) if best else {},
            best.number if best else None,
        )

    def status(self) -> str:
        """`done` (budget finished), `wait` (the rest is running in other workers) or `open`."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        counts = self.counts()
        finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        if finished >= self.budget:
            return "done"
        if finished + counts[TrialState.RUNNING] + counts[TrialState.WAITING] >= self.budget:
            return "wait"
        return "open"

    def claimed_before(self, trial: optuna.Trial) -> int:
        """How many live trials precede `trial`: the budget is spent when this reaches it."""
        return sum(t.number < trial.number for t in self.trials(LIVE))


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The COMPLETE trial with the highest value, or a ValueError saying the study must be tuned first."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError(f"study {study.study_name!r} has no COMPLETE trial: tune it before the final runs")
    return max(complete, key=lambda t: t.value)


def budget_report(storage: str, experiment: str, loss_names: Sequence[str]) -> Any:
    """Per loss, the stored study's budget and its trials by state: shows that every loss had an equal budget."""
    import pandas as pd

    rdb = (
        None if layout.missing_sqlite(storage) else open_storage(storage)
    )  # reading must not create a database
    known = set() if rdb is None else set(optuna.get_all_study_names(rdb))
    rows = []
    for loss in loss_names:
        name = study_name(experiment, loss)
        row: dict[str, Any] = {"loss": loss, "study": name, "budget": None, "best_value": None}
        trials: list[FrozenTrial] = []
        if name in known:
            study = optuna.load_study(study_name=name, storage=rdb)
            trials = study.get_trials(deepcopy=False)
            values = [t.value for t in trials if t.state == TrialState.COMPLETE]
            row.update(budget=study.user_attrs.get("budget"), best_value=max(values) if values else None)
        count = {state: sum(t.state == state for t in trials) for state in TrialState}
        rows.append(
            {
                **row,
                "complete": count[TrialState.COMPLETE],
                "pruned": count[TrialState.PRUNED],
                "failed": count[TrialState.FAIL],
                "running": count[TrialState.RUNNING],
                "finished": count[TrialState.COMPLETE] + count[TrialState.PRUNED],
            }
        )
    return pd.DataFrame(rows)[
        ["loss", "study", "budget", "complete", "pruned", "failed", "running", "finished", "best_value"]
    ]
