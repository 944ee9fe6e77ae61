"""Tuning many losses in one process: each loss's study, trial body and MLflow parent run, taken in turn.

Budgets stay equal: losses are tuned round-robin, so a `timeout` that cuts the command short leaves them at
most one trial apart, and re-running continues every study. Any number of workers may join the same studies:
each checks, once its trial has a number, that fewer than `budget` live trials precede it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from bench.config import ConfigError, Experiment
from bench.data import DatasetBundle, load_dataset
from bench.tune.edges import EdgeHit, study_edge_hits, widened_ranges
from bench.tune.job import TuneJob
from bench.tune.objective import Objective, SurplusTrial
from bench.tune.space import for_loss, with_overrides
from bench.tune.study import LossStudy, StudySummary, open_storage
from bench.vocabulary import OBJECTIVE, PARENT_RUN_ATTR, STAGE, STUDY, Stage, study_name

if TYPE_CHECKING:  # MLflow is imported by the caller that builds the tracker
    from bench.tracking import Tracker

Log = Callable[[str], None]


@dataclass
class TrialLine:
    """What one finished trial reports (the progress line is built from it)."""

    loss: str
    number: int
    state: str
    value: float | None
    best: float | None
    seconds: float


class LossTuner:
    """One loss's tuning: its study (`tune.epochs` per trial), the trial body, and the study's MLflow run."""

    def __init__(
        self,
        exp: Experiment,
        storage: optuna.storages.RDBStorage,
        tracker: Tracker | None,
        bundle: DatasetBundle,
        *,
        device: str = "auto",
        name: str | None = None,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        """`pruner` replaces the one `tune.pruner` names (any Optuna pruner)."""
        if exp.tune.cv_folds == 1 and bundle.val is None:
            raise ConfigError(
                "tuning needs validation classes: set data.val_fraction > 0 (or tune.cv_folds > 1)"
            )
        trial_exp = with_overrides(exp, {"train.epochs": exp.tune.epochs or exp.train.epochs})
        self.study = LossStudy(trial_exp, storage, name, pruner)
        self.loss, self.budget, self.tracker = self.study.loss, self.study.budget, tracker
        self.parent_run_id = self._parent_run() if tracker is not None else None
        self.objective = Objective(self.study, bundle, tracker, device, self.parent_run_id)

    def _parent_run(self) -> str:
        """The study's MLflow parent run: made by the worker that created the study, found by the others."""
        assert self.tracker is not None
        attrs = self.study.study.user_attrs  # read from the storage on every access
        for _ in range(60):  # the creator is about to store it: wait up to 30 s
            if PARENT_RUN_ATTR in attrs or self.study.created:
                break
            time.sleep(0.5)
            attrs = self.study.study.user_attrs
        run_id = attrs.get(PARENT_RUN_ATTR)
        if self.tracker.has_run(run_id):
            if self.tracker.get_run(run_id).info.status != "RUNNING" and not self.summary().done:
                self.tracker.resume_run(run_id)  # the budget was raised: the study is open again
            return run_id
        name = self.study.name
        run_id = self.tracker.start_run(name, {STAGE: Stage.STUDY, STUDY: name, "loss": self.loss})
        setup = self.study.setup()
        params = {key: setup[key] for key in ("loss", "budget", "sampler", "pruner", "cv_folds", "epochs")}
        params.update(seed=setup["sampler_seed"], dataset=self.study.exp.data.name)
        self.tracker.log_params(run_id, {**params, "search_space": json.dumps(setup["search_space"])})
        self.study.study.set_user_attr(PARENT_RUN_ATTR, run_id)
        return run_id

    def summary(self) -> StudySummary:
        return self.study.summary()

    def status(self) -> str:
        return self.study.status()

    def run_one(self) -> TrialLine | None:
        """Run one trial (Optuna handles heartbeats, pruned and failed states); None if the slot went
        elsewhere."""
        started = time.perf_counter()
        ended: list[FrozenTrial] = []
        self.study.study.optimize(
            self.objective,
            n_trials=1,
            catch=(SurplusTrial,),
            callbacks=[lambda _, trial: ended.append(trial)],
        )
        if not ended or ended[0].user_attrs.get("surplus"):
            return None
        trial = ended[0]
        value = trial.value if trial.state == TrialState.COMPLETE else trial.user_attrs.get("last_value")
        seconds = time.perf_counter() - started
        return TrialLine(self.loss, trial.number, trial.state.name, value, self.summary().best_value, seconds)

    def edge_hits(self) -> list[EdgeHit]:
        return study_edge_hits(self.study.study)

    def close(self) -> StudySummary:
        """When the budget is finished: best value and parameters onto the parent run, which then ends; the
        parameters whose best value sits at an edge of their range are tagged `edge.<param>` = low | high."""
        summary = self.summary()
        if self.tracker is None or not summary.done or summary.best_value is None:
            return summary
        metrics = {
            f"best/{OBJECTIVE.replace('/', '_')}": summary.best_value,
            "trials_complete": summary.complete,
            "trials_pruned": summary.pruned,
            "trials_failed": summary.failed,
        }
        self.tracker.log_metrics(self.parent_run_id, metrics)
        best = {f"best.{k}": v for k, v in summary.best_overrides.items()}
        edges = {f"edge.{hit.param}": hit.side for hit in self.edge_hits()}
        tags = {"best_trial": summary.best_trial, "budget": self.budget, "edges": len(edges), **best, **edges}
        self.tracker.set_tags(self.parent_run_id, tags)
        self.tracker.end_run(self.parent_run_id, "FINISHED")
        return summary


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(line: TrialLine, done: int, budget: int, left_s: float | None) -> str:
    value = "-" if line.value is None else f"{line.value:.4f}"
    best = "-" if line.best is None else f"{line.best:.4f}"
    state = "" if line.state == "COMPLETE" else f" ({line.state.lower()})"
    left = "?" if left_s is None else format_seconds(left_s)
    return (
        f"[tune] {line.loss:<16} trial {line.number:>3} ({done}/{budget}): val MAP@R {value}{state} | "
        f"best {best} | {format_seconds(line.seconds)} | ~{left} left"
    )


class InterruptedTrialFilter(logging.Filter):
    """Optuna logs a trial that Ctrl-C stopped as failed: the interrupt's traceback, then "Trial N failed with
    value None". The trial is FAIL in the study as it should be; the command prints its own one line, so
    both records are dropped. Every other failure is still logged."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        trial = re.match(r"Trial (\d+) failed with", message)
        if trial is None:
            return True
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            self.interrupted.add(trial.group(1))
            return False
        return not (
            message.startswith(f"Trial {trial.group(1)} failed with value")
            and trial.group(1) in self.interrupted
        )


def quiet_interrupted_trials() -> None:
    """Install `InterruptedTrialFilter` once on the logger of Optuna's optimize loop."""
    logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, InterruptedTrialFilter) for f in logger.filters):
        logger.addFilter(InterruptedTrialFilter())


def tune_losses(
    job: TuneJob,
    *,
    tracker: Tracker | None = None,
    bundle: DatasetBundle | None = None,
    log: Log | None = print,
) -> dict[str, StudySummary]:
    """Tune each of the job's losses until its study has `tune.trials` finished trials, one trial per loss in
    turn.

    No new trial starts after `job.timeout` seconds. Trials running in other workers are waited for, so when
    this returns without a timeout every study is complete.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_interrupted_trials()
    bundle = bundle or load_dataset(job.exp.data)
    rdb = open_storage(job.storage, job.heartbeat_interval, job.grace_period)
    tuners = [
        LossTuner(for_loss(job.exp, loss), rdb, tracker, bundle, device=job.device, name=job.study_name)
        for loss in job.losses
    ]
    timeout = job.timeout
    deadline = None if timeout is None else time.monotonic() + timeout

    def past_deadline() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    durations: list[float] = []
    while True:
        states = {t.loss: t.status() for t in tuners}
        if all(v == "done" for v in states.values()):
            break
        if past_deadline():
            if log:
                log(f"[tune] timeout after {timeout:.0f}s: re-run the same command to continue the studies")
            break
        open_tuners = [t for t in tuners if states[t.loss] == "open"]
        for tuner in open_tuners:
            if past_deadline():
                break
            line = tuner.run_one()
            if line is not None and log is not None:
                durations.append(line.seconds)
                left = sum(max(t.budget - t.summary().complete - t.summary().pruned, 0) for t in tuners)
                done = tuner.summary().complete + tuner.summary().pruned
                log(progress_line(line, done, tuner.budget, float(np.mean(durations)) * left))
        if not open_tuners:
            time.sleep(job.poll_s)  # the remaining trials run in other workers (or dead ones, until stale)
    summaries = {t.loss: t.close() for t in tuners}
    if log is not None:
        for tuner in tuners:
            for hit in tuner.edge_hits():
                log(f"[tune] edge: {tuner.loss} {hit.describe()}; its optimum may lie beyond (see --widen)")
    return summaries


def ranges_to_widen(job: TuneJob, factor: float) -> dict[str, dict[str, list[float]]]:
    """For each loss whose (original) study's best value hit an edge: its ranges widened by `factor`, as
    `tune.widen`."""
    rdb = open_storage(job.storage)
    existing = set(optuna.get_all_study_names(rdb))
    widen = {}
    for loss in job.losses:
        name = study_name(job.exp.name, loss)
        hits = study_edge_hits(optuna.load_study(study_name=name, storage=rdb)) if name in existing else []
        if hits:
            widen[loss] = widened_ranges(hits, factor)
    return widen
