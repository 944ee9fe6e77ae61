"""A loss's Optuna study: created once, audited on every later open, counted from the storage.

Optuna only: nothing here knows about MLflow or training. A study lives in an RDB storage with heartbeats, so
a worker killed mid-trial leaves a trial that the next worker marks FAIL once its heartbeat is stale; one
killed before its trial's first heartbeat is caught too (`LossStudy.fail_silent_trials`). A database that goes
away is waited for (`ResilientStorage`), and a worker that waits in vain stops with `StorageLost`.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from bench import layout
from bench.backoff import with_backoff
from bench.config import ConfigError, Experiment
from bench.tracking import redact
from bench.tune.sampler import make_pruner, make_sampler
from bench.tune.space import describe_space, recipe_fingerprint
from bench.vocabulary import study_name

HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 60  # a RUNNING trial without a heartbeat for this long belongs to a dead worker
STORAGE_RETRY_S = 120.0  # how long a call waits for a database that went away before the worker gives up
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
SILENT_FAILURE = "no heartbeat within the grace period: its worker died before the first one"


def loss_study_name(exp: Experiment) -> str:
    """The study of `exp`'s loss: `<experiment>-<loss>`, or its `-widened` successor when `tune.widen` has
    it."""
    return study_name(exp.name, exp.loss.name, widened=exp.loss.name in exp.tune.widen)


class StorageLost(BaseException):
    """The Optuna database did not answer for the whole retry period: this worker stops; the trial it was
    running keeps its last heartbeat, so another worker fails it once that heartbeat is stale.

    A BaseException, as KeyboardInterrupt is: nothing may catch it as a failed trial, since recording that
    would need the database (Optuna's trial bookkeeping would fail on it and hide this message)."""


def connection_lost(error: BaseException) -> bool:
    """Whether `error`, or an error behind it, says the database could not be reached (a refused or cut
    connection), as opposed to a query the database refused."""
    seen: BaseException | None = error
    for _ in range(10):  # Optuna wraps SQLAlchemy's error, which wraps the driver's
        if seen is None:
            return False
        if isinstance(seen, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
            return True
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class ResilientStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, riding out a database restart: a call whose connection fails is retried with
    exponential backoff (0.5 s doubling up to 16 s) for `retry_s` seconds.

    Every storage call Optuna makes goes through here, the heartbeat thread's included, so a trial survives a
    restart of the database in the middle of its training. When a call has waited `retry_s` in vain the
    storage is lost: that call and every later one raise `StorageLost` at once, so the worker stops instead
    of waiting again at each call.
    """

    def __init__(self, url: str, *, retry_s: float = STORAGE_RETRY_S, **kwargs: Any) -> None:
        self.retry_s, self.shown_url = retry_s, redact(url)
        self.lost: StorageLost | None = None
        self._calling = threading.local()  # set while a call of this thread retries: inner calls do not
        super().__init__(url, **kwargs)

    def _retrying(self, call: Callable[[], Any]) -> Any:
        if self.lost is not None:
            raise self.lost
        if getattr(self._calling, "active", False):
            return call()
        self._calling.active = True
        try:
            return with_backoff(
                call,
                transient=connection_lost,
                seconds=self.retry_s,
                first_delay=0.5,
                max_delay=16.0,
                give_up=self._lose,
            )
        finally:
            self._calling.active = False

    def _lose(self, error: BaseException) -> StorageLost:
        """Give up on the storage: this call and every later one raise the returned StorageLost."""
        self.lost = StorageLost(
            f"lost the Optuna storage {self.shown_url}: no answer for {self.retry_s:.0f} s "
            f"({first_line(error)}); this worker stops, "
            "and its running trial is failed by heartbeat once another worker sees it stale"
        )
        return self.lost

    def record_heartbeat(self, trial_id: int) -> None:
        """A heartbeat, retried like every call; once the storage is lost the heartbeats stop quietly (the
        heartbeat thread has no one to tell: the worker's own next call raises StorageLost)."""
        try:
            self._retrying(lambda: super(ResilientStorage, self).record_heartbeat(trial_id))
        except StorageLost:
            pass

    def silent_trial_ids(self, study_id: int) -> set[int]:
        """The study's RUNNING trials that have never recorded a heartbeat (Optuna's own staleness check
        skips them: it only compares heartbeats)."""
        from optuna.storages._rdb import models  # Optuna's table definitions; no public query reaches them

        query = sqlalchemy.select(models.TrialModel.trial_id).where(
            models.TrialModel.study_id == study_id,
            models.TrialModel.state == TrialState.RUNNING,
            ~models.TrialModel.heartbeats.any(),
        )
        with self.engine.connect() as connection:
            return set(connection.execute(query).scalars())


def first_line(error: BaseException) -> str:
    """The first line of the error behind `error`: Optuna's wrapper says nothing, SQLAlchemy's adds SQL."""
    text = str(error.__cause__ or error).strip()
    return redact(text.splitlines()[0]) if text else type(error).__name__


def _retried(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: ResilientStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retrying(lambda: method(self, *args, **kwargs))

    return call


_STORAGE_CALLS = [
    name
    for name, value in vars(optuna.storages.BaseStorage).items()
    if callable(value) and not name.startswith("_")
] + ["_get_stale_trial_ids", "silent_trial_ids"]
for _name in _STORAGE_CALLS:
    setattr(ResilientStorage, _name, _retried(getattr(ResilientStorage, _name)))


def with_driver(url: str) -> str:
    """`postgresql://` names SQLAlchemy's default driver, psycopg2; the `postgres` extra installs psycopg 3,
    so a plain URL uses it when psycopg2 is absent."""
    plain = url.startswith("postgresql://") or url.startswith("postgres://")
    if plain and importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_storage(
    url: str,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
    retry_s: float | None = None,
) -> ResilientStorage:
    """An RDB storage with heartbeats that waits out a database restart (`retry_s`, default
    `STORAGE_RETRY_S`); SQLite waits for locks (several local workers) instead of failing."""
    retry_s = STORAGE_RETRY_S if retry_s is None else retry_s
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}  # connections cut by a restart are replaced
    if layout.sqlite_path(url) is not None:
        layout.make_sqlite_folder(url)
        engine_kwargs = {"connect_args": {"timeout": 120}}
    deadline, attempt = time.monotonic() + retry_s, 0
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return ResilientStorage(
                    with_driver(url),
                    retry_s=retry_s,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                )
        except sqlalchemy.exc.SQLAlchemyError as error:
            # unreachable: wait up to retry_s; else two workers created the schema at once: the loser
            # retries a few times and finds it
            lost = connection_lost(error)
            if (lost and time.monotonic() >= deadline) or (not lost and attempt >= 4):
                reason = str(getattr(error, "orig", None) or error).splitlines()[0]  # the driver's own words
                raise StorageLost(f"cannot open Optuna storage {redact(url)}: {reason}") from error
            time.sleep(min(0.5 * 2**attempt, 16.0))
            attempt += 1


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
        storage: ResilientStorage,
        name: str | None = None,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        """`exp` is the trial recipe (its `train.epochs` the trials' epochs); `pruner` replaces
        `tune.pruner`'s."""
        self.exp, self.storage = exp, storage
        self.silent_since: dict[int, float] = {}  # trial id -> when this worker first saw it silent
        self.loss = exp.loss.name
        self.name = name or loss_study_name(exp)
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
                f"study {self.name!r} in this storage was tuned with other fixed settings "
                "(data, model, epochs, ...); its trials would not be comparable: "
                "pass another --study-name or delete the study"
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
        """`done` (budget finished), `wait` (the rest is running in other workers) or `open` (including
        trials enqueued but not yet started)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        self.fail_silent_trials()
        counts = self.counts()
        finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
        if finished >= self.budget:
            return "done"
        if finished + counts[TrialState.RUNNING] >= self.budget:
            return "wait"
        return "open"  # an enqueued (WAITING) trial needs a worker: optimize() takes it before a new one

    def fail_silent_trials(self) -> list[int]:
        """Fail the RUNNING trials whose worker died between creating them and their first heartbeat; the
        ids of those failed here.

        Optuna's staleness check compares heartbeats, so such a trial would stay RUNNING forever and hold a
        slot of the budget. One still without a heartbeat a grace period after this worker first saw it
        belongs to a dead worker (a live one records its first heartbeat as the trial starts). Timed on this
        worker's own clock: clocks of other machines and the database's time zone do not matter.
        """
        storage = self.storage
        if storage.heartbeat_interval is None:
            return []
        grace = storage.grace_period or 2 * storage.heartbeat_interval
        now = time.monotonic()
        silent = storage.silent_trial_ids(storage.get_study_id_from_name(self.name))
        self.silent_since = {trial: self.silent_since.get(trial, now) for trial in silent}
        failed = []
        for trial_id, since in self.silent_since.items():
            if now - since < grace:
                continue
            try:
                storage.set_trial_user_attr(trial_id, "failed", SILENT_FAILURE)
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
                failed.append(trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker failed it first
        return failed

    def claimed_before(self, trial: optuna.Trial) -> int:
        """How many live trials precede `trial`: the budget is spent when this reaches it."""
        return sum(t.number < trial.number for t in self.trials(LIVE))


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The COMPLETE trial with the highest value, or a ValueError saying the study must be tuned first."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError(f"study {study.study_name!r} has no COMPLETE trial: tune it before the final runs")
    return max(complete, key=lambda t: t.value)
