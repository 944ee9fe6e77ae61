"""One trial: the suggested overrides trained once (or over class-disjoint folds) and scored on validation.

Trials never touch the test split. A setting that makes the loss diverge is a legitimate (bad) outcome: the
trial is pruned with the reason kept, not counted as a crash.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import optuna
from optuna.trial import TrialState

from bench import layout
from bench.config import Experiment
from bench.data import DatasetBundle, EvalSplit
from bench.data.splits import class_folds
from bench.device import resolve_device
from bench.train import NonFiniteLossError, loggable_params, train_and_evaluate
from bench.tune.space import suggest_overrides, with_overrides
from bench.tune.study import LossStudy
from bench.vocabulary import FOLD, OBJECTIVE, OPTUNA_STATE, STAGE, STUDY, TRIAL, Stage

if TYPE_CHECKING:  # MLflow is imported by the caller that builds the tracker
    from bench.tracking import Tracker


class SurplusTrial(RuntimeError):
    """Another worker claimed the last slot of the budget first; this trial is failed before any training."""


class Objective:
    """The function Optuna optimises for one loss's study."""

    def __init__(
        self,
        study: LossStudy,
        bundle: DatasetBundle,
        tracker: Tracker | None = None,
        device: str = "auto",
        parent_run_id: str | None = None,
    ) -> None:
        self.study, self.bundle, self.tracker = study, bundle, tracker
        self.device, self.parent_run_id = device, parent_run_id

    def __call__(self, trial: optuna.Trial) -> float:
        study = self.study
        worker = worker_record(self.device)
        for key, value in worker.items():
            trial.set_user_attr(key, value)
        if study.claimed_before(trial) >= study.budget:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"study {study.name}: budget of {study.budget} trials already claimed")
        overrides = suggest_overrides(trial, study.exp)
        trial.set_user_attr("overrides", overrides)
        workdir = layout.trial_dir(study.exp.train.checkpoint_dir, study.name, trial.number)
        texp = with_overrides(
            study.exp, {**overrides, "train.checkpoint_dir": str(workdir), "tracking.log_checkpoint": False}
        )
        tags = {STAGE: Stage.TRIAL, STUDY: study.name, TRIAL: str(trial.number), **worker}
        try:
            if texp.tune.cv_folds > 1:
                return self._cross_validate(trial, texp, tags)
            return self._train_once(trial, texp, tags)
        except NonFiniteLossError as error:
            trial.set_user_attr("diverged", str(error))
            raise optuna.TrialPruned(str(error)) from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _train_once(self, trial: optuna.Trial, texp: Experiment, tags: dict[str, str]) -> float:
        def report(epoch: int, val: dict[str, float]) -> None:
            report_value(trial, val[OBJECTIVE], epoch, last=epoch + 1 == texp.train.epochs)

        try:
            result = train_and_evaluate(
                texp,
                self.tracker,
                device=self.device,
                epoch_callback=report,
                evaluate_test=False,
                run_name=f"{self.study.name}-trial{trial.number}",
                tags=tags,
                parent_run_id=self.parent_run_id,
                bundle=self.bundle,
                progress=False,
            )
        except optuna.TrialPruned:
            if self.tracker is not None:
                for run in self.tracker.find_runs(tags=tags):
                    self.tracker.set_tags(run.info.run_id, {OPTUNA_STATE: TrialState.PRUNED.name})
            raise
        self._mark_complete(trial, result.run_id)
        return float(result.val_history[-1][OBJECTIVE])

    def _cross_validate(self, trial: optuna.Trial, texp: Experiment, tags: dict[str, str]) -> float:
        """Mean validation MAP@R over class-disjoint folds of the training classes; reported after each
        fold."""
        folds = class_folds(self.bundle.train.labels, texp.tune.cv_folds)
        scores: list[float] = []
        with self._trial_run(trial, texp, tags) as run_id:
            for fold, (train_idx, val_idx) in enumerate(folds):
                fexp = with_overrides(
                    texp, {"train.checkpoint_dir": f"{texp.train.checkpoint_dir}/fold-{fold}"}
                )
                result = train_and_evaluate(
                    fexp,
                    self.tracker,
                    device=self.device,
                    evaluate_test=False,
                    run_name=f"{self.study.name}-trial{trial.number}-fold{fold}",
                    tags={**tags, STAGE: Stage.CV_FOLD, FOLD: str(fold)},
                    parent_run_id=run_id,
                    bundle=fold_bundle(self.bundle, train_idx, val_idx, texp),
                    progress=False,
                )
                scores.append(float(result.val_history[-1][OBJECTIVE]))
                if self.tracker is not None:
                    metrics = {OBJECTIVE: float(np.mean(scores)), "cv/fold_map_at_r": scores[-1]}
                    self.tracker.log_metrics(run_id, metrics, step=fold)
                report_value(trial, float(np.mean(scores)), fold, last=fold + 1 == len(folds))
            self._mark_complete(trial, run_id)
        return float(np.mean(scores))

    @contextmanager
    def _trial_run(self, trial: optuna.Trial, texp: Experiment, tags: dict[str, str]) -> Iterator[str | None]:
        """The MLflow run that holds a cross-validated trial's folds (none without a tracker)."""
        if self.tracker is None:
            yield None
            return
        with self.tracker.run(f"{self.study.name}-trial{trial.number}", tags, self.parent_run_id) as run_id:
            self.tracker.log_params(run_id, loggable_params(texp))
            try:
                yield run_id
            except optuna.TrialPruned:
                self.tracker.set_tags(run_id, {OPTUNA_STATE: TrialState.PRUNED.name})
                raise

    def _mark_complete(self, trial: optuna.Trial, run_id: str | None) -> None:
        if self.tracker is not None and run_id:
            self.tracker.set_tags(run_id, {OPTUNA_STATE: TrialState.COMPLETE.name})
        trial.set_user_attr("mlflow_run_id", run_id)


def worker_record(device: str) -> dict[str, str]:
    """Which worker runs a trial: `worker` = host:pid, and `worker_gpu` = the GPUs it may use (its
    CUDA_VISIBLE_DEVICES pin, `all` unpinned) or `none` on the CPU."""
    gpu = "none"
    if resolve_device(device).type == "cuda":
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    return {"worker": f"{socket.gethostname()}:{os.getpid()}", "worker_gpu": gpu}


def report_value(trial: optuna.Trial, value: float, step: int, last: bool) -> None:
    """Report an intermediate value; prune unless it is the last step (a finished trial is not 'stopped
    early')."""
    trial.set_user_attr("last_value", value)
    trial.report(value, step)
    if not last and trial.should_prune():
        raise optuna.TrialPruned(f"pruned at step {step} with {OBJECTIVE}={value:.4f}")


def fold_bundle(
    bundle: DatasetBundle, train_idx: np.ndarray, val_idx: np.ndarray, exp: Experiment
) -> DatasetBundle:
    """Train on some training classes, validate on the held-out fold (no augmentation); never the test
    classes."""
    from bench.data.images import ImageList
    from bench.data.omniglot import TensorImages
    from bench.data.transforms import make_transforms

    train = bundle.train
    if isinstance(train, TensorImages):
        fold_train, fold_val = train.subset(train_idx), train.subset(val_idx, augment=False)
    elif isinstance(train, ImageList):
        fold_train = train.subset(train_idx)
        fold_val = train.subset(val_idx, transform=make_transforms(exp.data)[1])
    else:
        raise TypeError(
            f"tune.cv_folds > 1 needs a training set with .subset(); {type(train).__name__} has none"
        )
    return DatasetBundle(bundle.name, fold_train, EvalSplit("val", fold_val), [], dict(bundle.info))
