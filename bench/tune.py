"""Fair head-to-head tuning: one Optuna study per loss on an equal trial budget, then S final seeds per loss.

Fairness rules built in here (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020):
- every loss gets the same budget of finished (COMPLETE + PRUNED) trials, the same recipe and the same data;
- trials are scored on validation classes held out from training (or class-disjoint k-fold over the training
  classes), never on test classes; only the final seed runs touch the test set, once each.

Robustness: a study lives in an Optuna RDB storage with heartbeats, so a worker killed mid-trial leaves a trial
that the next worker marks FAIL once its heartbeat is stale; completed trials are never rewritten. Any number of
workers may join a study: each checks, after its trial got a number, that fewer than `budget` live trials precede
it, so together they finish exactly `budget` trials. Each trial draws its suggestions from a TPE sampler seeded
by (sampler seed, trial number): runs are reproducible and parallel workers never propose the same startup point.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from optuna.distributions import distribution_to_json
from optuna.trial import TrialState

import losses as loss_registry
from bench.config import ConfigError, Experiment, experiment_from_dict, set_path
from bench.data import DatasetBundle, EvalSplit, load_dataset
from bench.data.splits import class_folds
from bench.train import (
    NonFiniteLossError,
    RunResult,
    default_checkpoint_path,
    load_checkpoint,
    loggable_params,
    train_and_evaluate,
)

if TYPE_CHECKING:  # MLflow is imported by the caller that builds the tracker
    from bench.tracking import Tracker

HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 60  # a RUNNING trial without a heartbeat for this long belongs to a dead worker
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
OBJECTIVE = "val/map_at_r"

Log = Callable[[str], None]


class SurplusTrial(RuntimeError):
    """Another worker claimed the last slot of the budget first; this trial is failed before any training."""


def study_name(experiment: str, loss: str) -> str:
    return f"{experiment}-{loss}"


# ----------------------------------------------------------------------------------------------------- storage


def open_storage(
    url: str, heartbeat_interval: int = HEARTBEAT_INTERVAL, grace_period: int = GRACE_PERIOD
) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; SQLite waits for locks (several local workers) instead of failing."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
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
    raise RuntimeError(f"cannot open Optuna storage {_redact(url)}: {last_error}") from last_error


def _redact(url: str) -> str:
    from bench.tracking import redact

    return redact(url)


# ------------------------------------------------------------------------------------------------ search space


def with_overrides(exp: Experiment, overrides: dict[str, Any]) -> Experiment:
    """A copy of `exp` with dotted keys (`optim.lr`, `loss.params.margin`) set; unknown keys raise ConfigError."""
    raw = exp.to_dict()
    for key, value in overrides.items():
        set_path(raw, key, value)
    return experiment_from_dict(raw)


def for_loss(exp: Experiment, loss: str) -> Experiment:
    """`exp` training `loss`; the config's fixed `loss.params` belong to its own loss and are kept only for it."""
    if loss == exp.loss.name:
        return exp
    return with_overrides(exp, {"loss.name": loss, "loss.params": {}})


def suggest_shared(trial: optuna.Trial, shared_space: dict[str, Any]) -> dict[str, Any]:
    """Suggest each `tune.shared_space` entry: {"low", "high", "log"?, "step"?} (int when both ends are ints) or
    {"choices": [...]}. The Optuna parameter is named by the dotted config key."""
    values: dict[str, Any] = {}
    for key, spec in shared_space.items():
        where = f"tune.shared_space.{key}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping with low/high or choices, got {spec!r}")
        unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
        if unknown:
            raise ConfigError(f"{where}: unknown field {unknown[0]!r} (known: low, high, log, step, choices)")
        if "choices" in spec:
            if not isinstance(spec["choices"], list) or not spec["choices"]:
                raise ConfigError(f"{where}.choices: expected a non-empty list, got {spec['choices']!r}")
            values[key] = trial.suggest_categorical(key, spec["choices"])
            continue
        if "low" not in spec or "high" not in spec:
            raise ConfigError(f"{where}: needs low and high, or choices")
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
            values[key] = trial.suggest_int(key, low, high, step=int(spec.get("step", 1)), log=log)
            continue
        try:
            low, high = float(low), float(high)  # YAML 1.1 reads "1e-4" as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: low/high must be numbers, got {low!r}, {high!r}") from None
        step = float(spec["step"]) if spec.get("step") is not None else None
        values[key] = trial.suggest_float(key, low, high, log=log, step=step)
    return values


def suggest_overrides(trial: optuna.Trial, exp: Experiment) -> dict[str, Any]:
    """The trial's config overrides: the loss's own search space as `loss.params.<name>`, then shared entries."""
    spec = loss_registry.get_spec(exp.loss.name)
    overrides: dict[str, Any] = {}
    if spec.search_space is not None:
        overrides.update({f"loss.params.{k}": v for k, v in spec.search_space(trial).items()})
    overrides.update(suggest_shared(trial, exp.tune.shared_space))
    return overrides


def describe_space(exp: Experiment) -> dict[str, str]:
    """The search space as Optuna distribution JSON, recorded in the study so budgets and spaces can be audited.

    Drawing one probe point also checks every key and value against the config before any trial starts.
    """
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = probe.ask()
    with_overrides(exp, suggest_overrides(trial, exp))
    return {name: distribution_to_json(dist) for name, dist in sorted(trial.distributions.items())}


def recipe_fingerprint(exp: Experiment, space: dict[str, Any]) -> str:
    """Hash of the fixed settings every trial of a study shares (all but the tuned keys, budget and stores)."""
    tuned = set(space) | {f"loss.params.{name}" for name in space}
    skip = ("tune.trials", "tune.final_seeds", "tune.final_epochs", "tune.storage", "tracking.", "train.checkpoint_dir")
    fixed = {k: v for k, v in exp.flat().items() if k not in tuned and not k.startswith(skip)}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE whose random state for trial n is seeded from (seed, n).

    One seeded TPESampler per process would make two workers draw the same random startup points; seeding by trial
    number keeps a study reproducible after restarts and gives every parallel trial its own draw. TPE keeps no
    state besides its RNG (it reads the history from the storage), so a fresh sampler per trial loses nothing.
    """

    def __init__(self, seed: int, n_startup_trials: int) -> None:
        self.seed = seed
        self.n_startup_trials = n_startup_trials
        self._current: tuple[int, optuna.samplers.TPESampler] | None = None

    def _sampler(self, trial: optuna.trial.FrozenTrial) -> optuna.samplers.TPESampler:
        if self._current is None or self._current[0] != trial.number:
            seed = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                tpe = optuna.samplers.TPESampler(
                    seed=seed, n_startup_trials=self.n_startup_trials, constant_liar=True
                )
            self._current = (trial.number, tpe)
        return self._current[1]

    def infer_relative_search_space(self, study, trial):
        return self._sampler(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self._sampler(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self._sampler(trial).after_trial(study, trial, state, values)


def make_pruner(kind: str, budget: int, steps: int) -> optuna.pruners.BasePruner:
    """Median (after a quarter of the budget has finished) or Hyperband over `steps` epochs (or CV folds)."""
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, budget // 4), n_warmup_steps=1)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(steps, 1), reduction_factor=3)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"tune.pruner: unknown {kind!r}; available: median, hyperband, none")


# ---------------------------------------------------------------------------------------------------- the study


@dataclass
class TrialLine:
    """What one finished trial reports (the progress line is built from it)."""

    loss: str
    number: int
    state: str
    value: float | None
    best: float | None
    seconds: float


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
    """One loss's study: opens or continues it, runs one trial at a time, keeps its MLflow parent run."""

    def __init__(
        self,
        exp: Experiment,
        storage: optuna.storages.RDBStorage,
        tracker: Tracker | None,
        bundle: DatasetBundle,
        *,
        device: str = "auto",
        name: str | None = None,
        checkpoint_root: str | Path | None = None,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        """`pruner` replaces the one `tune.pruner` names (any Optuna pruner)."""
        if exp.tune.trials < 1:
            raise ConfigError(f"tune.trials must be at least 1, got {exp.tune.trials}")
        if exp.tune.cv_folds < 1:
            raise ConfigError(f"tune.cv_folds must be at least 1, got {exp.tune.cv_folds}")
        if exp.tune.cv_folds == 1 and bundle.val is None:
            raise ConfigError(
                "tuning needs validation classes: set data.val_fraction > 0 (or tune.cv_folds > 1)"
            )
        self.exp = with_overrides(exp, {"train.epochs": exp.tune.epochs or exp.train.epochs})
        self.loss = exp.loss.name
        self.name = name or study_name(exp.name, self.loss)
        self.budget = exp.tune.trials
        self.tracker = tracker
        self.bundle = bundle
        self.device = device
        root = Path(checkpoint_root or Path(exp.train.checkpoint_dir) / "tune")
        self.checkpoint_root = root / self.name
        self.steps = exp.tune.cv_folds if exp.tune.cv_folds > 1 else self.exp.train.epochs
        sampler = TrialSeededTPE(exp.tune.sampler_seed, n_startup_trials=max(2, self.budget // 3))
        pruner = pruner or make_pruner(exp.tune.pruner, self.budget, self.steps)
        self.space = describe_space(self.exp)
        try:
            self.study = optuna.create_study(
                storage=storage, study_name=self.name, direction="maximize", sampler=sampler, pruner=pruner
            )
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            self.study = optuna.load_study(
                study_name=self.name, storage=storage, sampler=sampler, pruner=pruner
            )
            created = False
        self._record_setup(created)
        self.parent_run_id = self._parent_run(created) if tracker is not None else None

    def _record_setup(self, created: bool) -> None:
        attrs = self.study.user_attrs
        stored = attrs.get("search_space")
        if not created and stored is not None and stored != self.space:
            raise ConfigError(
                f"study {self.name!r} in this storage was tuned over a different search space "
                f"({sorted(stored)} vs {sorted(self.space)}); pass another --study-name or delete the study"
            )
        recipe = recipe_fingerprint(self.exp, self.space)
        if not created and attrs.get("recipe") not in (None, recipe):
            raise ConfigError(
                f"study {self.name!r} in this storage was tuned with other fixed settings (data, model, epochs, "
                "...); its trials would not be comparable: pass another --study-name or delete the study"
            )
        setup = {
            "recipe": recipe,
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
        for key, value in setup.items():
            if attrs.get(key) != value:
                self.study.set_user_attr(key, value)

    def _parent_run(self, created: bool) -> str:
        """The study's MLflow parent run: made by the worker that created the study, found by the others."""
        assert self.tracker is not None
        run_id = self.study.user_attrs.get("mlflow_parent_run_id")
        waited = 0.0
        while run_id is None and not created and waited < 30:  # the creator is about to store it
            time.sleep(0.5)
            waited += 0.5
            run_id = optuna.load_study(study_name=self.name, storage=self.study._storage).user_attrs.get(
                "mlflow_parent_run_id"
            )
        if run_id is not None and self.tracker.has_run(run_id):
            if self.tracker.client.get_run(run_id).info.status != "RUNNING" and not self.summary().done:
                self.tracker.resume_run(run_id)  # the budget was raised: the study is open again
            return run_id
        run_id = self.tracker.start_run(self.name, {"stage": "study", "study": self.name, "loss": self.loss})
        self.tracker.log_params(
            run_id,
            {
                "loss": self.loss,
                "budget": self.budget,
                "sampler": "TPE",
                "seed": self.exp.tune.sampler_seed,
                "pruner": self.exp.tune.pruner,
                "cv_folds": self.exp.tune.cv_folds,
                "epochs": self.exp.train.epochs,
                "dataset": self.exp.data.name,
                "search_space": json.dumps(self.space),
            },
        )
        self.study.set_user_attr("mlflow_parent_run_id", run_id)
        return run_id

    # ------------------------------------------------------------------ state

    def counts(self) -> dict[TrialState, int]:
        trials = self.study.get_trials(deepcopy=False)
        return {state: sum(t.state == state for t in trials) for state in TrialState}

    def summary(self) -> StudySummary:
        counts = self.counts()
        complete = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
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

    # ------------------------------------------------------------------ one trial

    def run_one(self) -> TrialLine | None:
        """Run one trial (Optuna handles heartbeats, pruned and failed states); None if the slot went elsewhere."""
        started = time.perf_counter()
        self._number: int | None = None
        self.study.optimize(self._objective, n_trials=1, catch=(SurplusTrial,))
        if self._number is None:
            return None
        trial = self.study.get_trials(deepcopy=False)[self._number]
        if trial.user_attrs.get("surplus"):
            return None
        value = trial.value if trial.state == TrialState.COMPLETE else trial.user_attrs.get("last_value")
        return TrialLine(
            self.loss,
            trial.number,
            trial.state.name,
            value,
            self.summary().best_value,
            time.perf_counter() - started,
        )

    def _objective(self, trial: optuna.Trial) -> float:
        self._number = trial.number
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        ahead = [t for t in self.study.get_trials(deepcopy=False, states=LIVE) if t.number < trial.number]
        if len(ahead) >= self.budget:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"study {self.name}: budget of {self.budget} trials already claimed")
        overrides = suggest_overrides(trial, self.exp)
        trial.set_user_attr("overrides", overrides)
        workdir = self.checkpoint_root / f"trial-{trial.number}"
        texp = with_overrides(
            self.exp, {**overrides, "train.checkpoint_dir": str(workdir), "tracking.log_checkpoint": False}
        )
        tags = {"stage": "trial", "study": self.name, "trial": str(trial.number)}
        try:
            if self.exp.tune.cv_folds > 1:
                return self._cross_validate(trial, texp, tags)
            return self._train_once(trial, texp, tags)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _train_once(self, trial: optuna.Trial, texp: Experiment, tags: dict[str, str]) -> float:
        def report(epoch: int, val: dict[str, float]) -> None:
            _report(trial, val[OBJECTIVE], epoch, last=epoch + 1 == texp.train.epochs)

        try:
            result = train_and_evaluate(
                texp,
                self.tracker,
                device=self.device,
                epoch_callback=report,
                evaluate_test=False,
                run_name=f"{self.name}-trial{trial.number}",
                tags=tags,
                parent_run_id=self.parent_run_id,
                bundle=self.bundle,
                progress=False,
            )
        except optuna.TrialPruned:
            self._tag_trial_run(tags, "PRUNED")
            raise
        except NonFiniteLossError as error:  # a diverging setting is a legitimate (bad) outcome, not a crash
            trial.set_user_attr("diverged", str(error))
            raise optuna.TrialPruned(str(error)) from None
        if self.tracker is not None and result.run_id:
            self.tracker.set_tags(result.run_id, {"optuna.state": "COMPLETE"})
        trial.set_user_attr("mlflow_run_id", result.run_id)
        return float(result.val_history[-1][OBJECTIVE])

    def _cross_validate(self, trial: optuna.Trial, texp: Experiment, tags: dict[str, str]) -> float:
        """Mean validation MAP@R over class-disjoint folds of the training classes; reported after each fold."""
        folds = class_folds(self.bundle.train.labels, texp.tune.cv_folds)
        run_id = None
        if self.tracker is not None:
            run_id = self.tracker.start_run(f"{self.name}-trial{trial.number}", tags, self.parent_run_id)
            self.tracker.log_params(run_id, loggable_params(texp))
        scores: list[float] = []
        try:
            for fold, (train_idx, val_idx) in enumerate(folds):
                fexp = with_overrides(
                    texp, {"train.checkpoint_dir": f"{texp.train.checkpoint_dir}/fold-{fold}"}
                )
                result = train_and_evaluate(
                    fexp,
                    self.tracker,
                    device=self.device,
                    evaluate_test=False,
                    run_name=f"{self.name}-trial{trial.number}-fold{fold}",
                    tags={**tags, "stage": "cv_fold", "fold": str(fold)},
                    parent_run_id=run_id,
                    bundle=fold_bundle(self.bundle, train_idx, val_idx, texp),
                    progress=False,
                )
                scores.append(float(result.val_history[-1][OBJECTIVE]))
                mean = float(np.mean(scores))
                if self.tracker is not None:
                    self.tracker.log_metrics(
                        run_id, {OBJECTIVE: mean, "cv/fold_map_at_r": scores[-1]}, step=fold
                    )
                _report(trial, mean, fold, last=fold + 1 == len(folds))
        except optuna.TrialPruned:
            if self.tracker is not None:
                self.tracker.set_tags(run_id, {"optuna.state": "PRUNED"})
                self.tracker.end_run(run_id, "KILLED")
            raise
        except NonFiniteLossError as error:
            trial.set_user_attr("diverged", str(error))
            if self.tracker is not None:
                self.tracker.end_run(run_id, "FAILED")
            raise optuna.TrialPruned(str(error)) from None
        except BaseException:
            if self.tracker is not None:
                self.tracker.end_run(run_id, "FAILED")
            raise
        if self.tracker is not None:
            self.tracker.set_tags(run_id, {"optuna.state": "COMPLETE"})
            self.tracker.end_run(run_id, "FINISHED")
        trial.set_user_attr("mlflow_run_id", run_id)
        return float(np.mean(scores))

    def _tag_trial_run(self, tags: dict[str, str], state: str) -> None:
        if self.tracker is None:
            return
        runs = self.tracker.client.search_runs(
            [self.tracker.experiment_id],
            f"tags.study = '{tags['study']}' and tags.trial = '{tags['trial']}' and tags.stage = 'trial'",
        )
        for run in runs:
            self.tracker.set_tags(run.info.run_id, {"optuna.state": state})

    def close(self) -> StudySummary:
        """When the budget is finished: best value and parameters onto the parent run, which then ends."""
        summary = self.summary()
        if self.tracker is not None and summary.done and summary.best_value is not None:
            self.tracker.log_metrics(
                self.parent_run_id,
                {
                    f"best/{OBJECTIVE.replace('/', '_')}": summary.best_value,
                    "trials_complete": summary.complete,
                    "trials_pruned": summary.pruned,
                    "trials_failed": summary.failed,
                },
            )
            self.tracker.set_tags(
                self.parent_run_id,
                {
                    "best_trial": summary.best_trial,
                    "budget": self.budget,
                    **{f"best.{k}": v for k, v in summary.best_overrides.items()},
                },
            )
            self.tracker.end_run(self.parent_run_id, "FINISHED")
        return summary


def _report(trial: optuna.Trial, value: float, step: int, last: bool) -> None:
    """Report an intermediate value; prune unless it is the last step (a finished trial is not 'stopped early')."""
    trial.set_user_attr("last_value", value)
    trial.report(value, step)
    if not last and trial.should_prune():
        raise optuna.TrialPruned(f"pruned at step {step} with {OBJECTIVE}={value:.4f}")


def fold_bundle(
    bundle: DatasetBundle, train_idx: np.ndarray, val_idx: np.ndarray, exp: Experiment
) -> DatasetBundle:
    """Train on some training classes, validate on the held-out fold (no augmentation); never the test classes."""
    from bench.data.images import ImageList
    from bench.data.omniglot import TensorImages
    from bench.data.transforms import make_transforms

    train = bundle.train
    if isinstance(train, TensorImages):
        fold_train, fold_val = train.subset(train_idx), train.subset(val_idx, augment=False)
    elif isinstance(train, ImageList):
        fold_train, fold_val = (
            train.subset(train_idx),
            train.subset(val_idx, transform=make_transforms(exp.data)[1]),
        )
    else:
        raise TypeError(
            f"tune.cv_folds > 1 needs a training set with .subset(); {type(train).__name__} has none"
        )
    return DatasetBundle(bundle.name, fold_train, EvalSplit("val", fold_val), [], dict(bundle.info))


# ------------------------------------------------------------------------------------------- many losses at once


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _progress_line(line: TrialLine, done: int, budget: int, left_s: float | None) -> str:
    value = "-" if line.value is None else f"{line.value:.4f}"
    best = "-" if line.best is None else f"{line.best:.4f}"
    state = "" if line.state == "COMPLETE" else f" ({line.state.lower()})"
    left = "?" if left_s is None else format_seconds(left_s)
    return (
        f"[tune] {line.loss:<16} trial {line.number:>3} ({done}/{budget}): val MAP@R {value}{state} | "
        f"best {best} | {format_seconds(line.seconds)} | ~{left} left"
    )


def tune_losses(
    exp: Experiment,
    loss_names: Sequence[str],
    *,
    tracker: Tracker | None = None,
    storage: str | None = None,
    study_name_override: str | None = None,
    timeout: float | None = None,
    device: str = "auto",
    bundle: DatasetBundle | None = None,
    log: Log | None = print,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int = GRACE_PERIOD,
    poll_s: float = 2.0,
) -> dict[str, StudySummary]:
    """Tune each loss until its study has `exp.tune.trials` finished trials, one trial per loss in turn.

    Round-robin keeps budgets equal even when `timeout` (seconds; no new trial starts after it) cuts the command
    short; re-running continues every study. Trials running in other workers are waited for, so when this
    returns without a timeout every study is complete.
    """
    if study_name_override and len(loss_names) != 1:
        raise ConfigError("--study-name names one study: give exactly one loss with it")
    for loss in loss_names:
        loss_registry.get_spec(loss)  # unknown names fail before any data is read
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    bundle = bundle or load_dataset(exp.data)
    rdb = open_storage(storage or exp.tune.storage, heartbeat_interval, grace_period)
    studies = [
        LossStudy(for_loss(exp, loss), rdb, tracker, bundle, device=device, name=study_name_override)
        for loss in loss_names
    ]
    deadline = None if timeout is None else time.monotonic() + timeout
    durations: list[float] = []
    while True:
        states = {s.loss: s.status() for s in studies}
        if all(v == "done" for v in states.values()):
            break
        if deadline is not None and time.monotonic() >= deadline:
            if log:
                log(f"[tune] timeout after {timeout:.0f}s: re-run the same command to continue the studies")
            break
        ran = False
        for study in studies:
            if states[study.loss] != "open" or (deadline is not None and time.monotonic() >= deadline):
                continue
            line = study.run_one()
            ran = True
            if line is None or log is None:
                continue
            durations.append(line.seconds)
            summary = study.summary()
            left = sum(max(s.budget - s.summary().complete - s.summary().pruned, 0) for s in studies)
            log(
                _progress_line(
                    line, summary.complete + summary.pruned, study.budget, float(np.mean(durations)) * left
                )
            )
            states[study.loss] = study.status()
        if not ran:
            time.sleep(poll_s)  # the remaining trials belong to other workers (or to dead ones, until stale)
    return {s.loss: s.close() for s in studies}


def budget_report(storage: str, experiment: str, loss_names: Sequence[str]) -> Any:
    """Per loss, the stored study's budget and its trials by state: shows that every loss had an equal budget."""
    import pandas as pd

    missing_file = storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///") :]).is_file()
    rdb = None if missing_file else open_storage(storage)  # reading must not create an empty database
    known = set() if rdb is None else set(optuna.get_all_study_names(rdb))
    rows = []
    for loss in loss_names:
        name = study_name(experiment, loss)
        if name not in known:
            rows.append(
                {
                    "loss": loss,
                    "study": name,
                    "budget": None,
                    "complete": 0,
                    "pruned": 0,
                    "failed": 0,
                    "running": 0,
                    "finished": 0,
                    "best_value": None,
                }
            )
            continue
        study = optuna.load_study(study_name=name, storage=rdb)
        trials = study.get_trials(deepcopy=False)
        count = {state: sum(t.state == state for t in trials) for state in TrialState}
        values = [t.value for t in trials if t.state == TrialState.COMPLETE]
        rows.append(
            {
                "loss": loss,
                "study": name,
                "budget": study.user_attrs.get("budget"),
                "complete": count[TrialState.COMPLETE],
                "pruned": count[TrialState.PRUNED],
                "failed": count[TrialState.FAIL],
                "running": count[TrialState.RUNNING],
                "finished": count[TrialState.COMPLETE] + count[TrialState.PRUNED],
                "best_value": max(values) if values else None,
            }
        )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ final seeds


@dataclass
class FinalRun:
    loss: str
    seed: int
    run_id: str | None
    test_metrics: dict[str, float]
    skipped: bool  # already FINISHED in MLflow by an earlier command


def final_seeds(exp: Experiment, count: int | None = None) -> list[int]:
    """Seeds tuning seed + 1 .. + S: distinct from the tuning seed, so the reported runs are fresh draws."""
    count = exp.tune.final_seeds if count is None else count
    if count < 1:
        raise ConfigError(f"tune.final_seeds must be at least 1, got {count}")
    return [exp.train.seed + 1 + i for i in range(count)]


def run_finals(
    exp: Experiment,
    loss: str,
    *,
    tracker: Tracker | None,
    storage: str | None = None,
    seeds: Sequence[int] | None = None,
    device: str = "auto",
    bundle: DatasetBundle | None = None,
    log: Log | None = print,
    study: str | None = None,
) -> list[FinalRun]:
    """Retrain the loss's best trial with each seed (tune.final_epochs, else train.epochs) and test it once.

    Runs already FINISHED in MLflow for this study, best trial and seed are skipped; an interrupted one resumes
    from its checkpoint.
    """
    name = study or study_name(exp.name, loss)
    loaded = optuna.load_study(study_name=name, storage=open_storage(storage or exp.tune.storage))
    complete = loaded.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError(f"study {name!r} has no COMPLETE trial: tune it before the final runs")
    best = max(complete, key=lambda t: t.value)
    base = with_overrides(for_loss(exp, loss), best.user_attrs["overrides"])
    parent = loaded.user_attrs.get("mlflow_parent_run_id")
    bundle = bundle or load_dataset(exp.data)
    results = []
    for seed in seeds if seeds is not None else final_seeds(exp):
        fexp = with_overrides(
            base,
            {
                "train.seed": seed,
                "train.epochs": exp.tune.final_epochs or exp.train.epochs,
                "train.checkpoint_dir": str(
                    Path(exp.train.checkpoint_dir) / "final" / name / f"trial-{best.number}"
                ),
            },
        )
        tags = {"stage": "final", "study": name, "best_trial": str(best.number)}
        done = _finished_final(tracker, tags, seed)
        if done is not None:
            results.append(FinalRun(loss, seed, done.info.run_id, dict(done.data.metrics), True))
            continue
        checkpoint = default_checkpoint_path(fexp)
        resume = checkpoint.is_file() and not load_checkpoint(checkpoint).get("finished", False)
        started = time.perf_counter()
        result: RunResult = train_and_evaluate(
            fexp,
            tracker,
            device=device,
            resume=resume,
            evaluate_test=True,
            run_name=f"{loss}-final-seed{seed}",
            tags=tags,
            parent_run_id=parent if tracker is not None and tracker.has_run(parent) else None,
            bundle=bundle,
            progress=False,
        )
        results.append(FinalRun(loss, seed, result.run_id, result.test_metrics, False))
        if log:
            log(
                f"[final] {loss:<16} seed {seed}: test MAP@R {result.test_metrics.get('test/map_at_r', float('nan')):.4f}"
                f" | R@1 {result.test_metrics.get('test/recall_at_1', float('nan')):.4f} | "
                f"{format_seconds(time.perf_counter() - started)}"
            )
    return results


def _finished_final(tracker: Tracker | None, tags: dict[str, str], seed: int):
    if tracker is None:
        return None
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.stage = 'final' and tags.study = '{tags['study']}' and tags.best_trial = '{tags['best_trial']}' "
        f"and params.seed = '{seed}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0] if runs else None


# ------------------------------------------------------------------------------------------------ the main job


@dataclass
class MainJobResult:
    studies: dict[str, StudySummary]
    finals: dict[str, list[FinalRun]]
    budgets: Any  # pandas DataFrame from budget_report
    complete: bool  # every study reached its budget and every loss has its final runs
    report_files: list[Path] = field(default_factory=list)


def run_main_job(
    exp: Experiment,
    loss_names: Sequence[str],
    *,
    tracker: Tracker,
    storage: str | None = None,
    device: str = "auto",
    timeout: float | None = None,
    bundle: DatasetBundle | None = None,
    log: Log | None = print,
    report_dir: str | Path | None = None,
    after: Callable[[MainJobResult], list[Path]] | None = None,
) -> MainJobResult:
    """Tune every loss on an equal budget, run each loss's final seeds, then write the report.

    The report is `bench.report.make_report` into `report_dir` (default results/<tracking experiment>/) unless
    `after(result) -> files` replaces it. Re-running continues where the previous command stopped.
    """
    storage = storage or exp.tune.storage
    bundle = bundle or load_dataset(exp.data)
    started = time.perf_counter()
    studies = tune_losses(
        exp,
        loss_names,
        tracker=tracker,
        storage=storage,
        timeout=timeout,
        device=device,
        bundle=bundle,
        log=log,
    )
    finals: dict[str, list[FinalRun]] = {}
    if all(s.done for s in studies.values()):
        for loss in loss_names:
            finals[loss] = run_finals(
                exp, loss, tracker=tracker, storage=storage, device=device, bundle=bundle, log=log
            )
    budgets = budget_report(storage, exp.name, loss_names)
    result = MainJobResult(studies, finals, budgets, complete=len(finals) == len(loss_names))
    if log:
        log(f"[run] tuning and final seeds took {format_seconds(time.perf_counter() - started)}")
    if not result.complete:
        if log:
            log("[run] not every study reached its budget: re-run the same command to continue")
        return result
    if after is not None:
        result.report_files = list(after(result))
    else:
        from bench.report import make_report
        from bench.train import resolve_device

        out = Path(report_dir or Path("results") / exp.tracking.experiment)
        result.report_files = make_report(
            tracker.uri,
            exp.tracking.experiment,
            out,
            optuna_storage=storage,
            device=resolve_device(device).type,
        )
        if log:
            log(f"[run] report: {len(result.report_files)} files in {out}/")
    return result
