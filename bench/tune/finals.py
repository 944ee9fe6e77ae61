"""Final seeds: each loss's best trial retrained with fresh seeds and tested once; the runs the report
compares."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import optuna

from bench import layout
from bench.config import ConfigError, Experiment
from bench.data import DatasetBundle, load_dataset
from bench.train import default_checkpoint_path, holds_unfinished_run, train_and_evaluate
from bench.tune.job import TuneJob
from bench.tune.runner import format_seconds
from bench.tune.space import for_loss, with_overrides
from bench.tune.study import best_trial, loss_study_name, open_storage
from bench.vocabulary import (
    BEST_TRIAL,
    PARENT_RUN_ATTR,
    STAGE,
    STUDY,
    SUPERSEDED_BY,
    TEST_MAP_AT_R,
    TEST_RECALL_AT_1,
    Stage,
    study_name,
)

if TYPE_CHECKING:  # MLflow is imported by the caller that builds the tracker
    from bench.tracking import Tracker

Log = Callable[[str], None]


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
    job: TuneJob,
    loss: str,
    *,
    tracker: Tracker | None,
    seeds: Sequence[int] | None = None,
    bundle: DatasetBundle | None = None,
    log: Log | None = print,
) -> list[FinalRun]:
    """Retrain the loss's best trial (in the job's `study_name`, else the loss's study) with each seed
    (`seeds`, default `final_seeds`; tune.final_epochs, else train.epochs) and test it once.

    Runs already FINISHED in MLflow for this study, best trial and seed are skipped; an interrupted one
    resumes from its checkpoint. A loss tuned again over widened ranges (`tune.widen`) is retrained from its
    widened study, and the final runs of its original study are tagged `superseded_by` (the report leaves
    them out).
    """
    exp = job.exp
    name = job.study_name or loss_study_name(for_loss(exp, loss))
    if tracker is not None and job.study_name is None and name != study_name(exp.name, loss):
        for old in tracker.find_runs(tags={STAGE: Stage.FINAL, STUDY: study_name(exp.name, loss)}):
            tracker.set_tags(old.info.run_id, {SUPERSEDED_BY: name})
    plan = _plan(job, loss, name, tracker)
    bundle = bundle or load_dataset(exp.data)
    results = []
    for seed in seeds if seeds is not None else final_seeds(exp):
        done = (
            None
            if tracker is None
            else tracker.find_run(tags=plan.tags, params={"seed": seed}, status="FINISHED")
        )
        if done is not None:
            results.append(FinalRun(loss, seed, done.info.run_id, dict(done.data.metrics), True))
        else:
            results.append(_train_final(job, plan, seed, tracker, bundle, log))
    return results


@dataclass(frozen=True)
class _FinalPlan:
    """What the final runs of one loss share: the best trial's config, where they are checkpointed and how
    they are tagged."""

    loss: str
    base: Experiment
    checkpoint_dir: str
    tags: dict[str, str]
    parent_run_id: str | None


def _plan(job: TuneJob, loss: str, name: str, tracker: Tracker | None) -> _FinalPlan:
    """The plan of study `name`'s best trial; its parent MLflow run where the tracker still has it."""
    exp = job.exp
    loaded = optuna.load_study(study_name=name, storage=open_storage(job.storage))
    best = best_trial(loaded)
    base = with_overrides(for_loss(exp, loss), best.user_attrs["overrides"])
    parent = loaded.user_attrs.get(PARENT_RUN_ATTR)
    parent = parent if tracker is not None and tracker.has_run(parent) else None
    checkpoint_dir = str(layout.final_dir(exp.train.checkpoint_dir, name, best.number))
    tags = {STAGE: Stage.FINAL, STUDY: name, BEST_TRIAL: str(best.number)}
    return _FinalPlan(loss, base, checkpoint_dir, tags, parent)


def _train_final(
    job: TuneJob, plan: _FinalPlan, seed: int, tracker: Tracker | None, bundle: DatasetBundle, log: Log | None
) -> FinalRun:
    """Train and test one final seed (resuming an interrupted one), and say how it did."""
    exp, loss = job.exp, plan.loss
    fexp = with_overrides(
        plan.base,
        {
            "train.seed": seed,
            "train.epochs": exp.tune.final_epochs or exp.train.epochs,
            "train.checkpoint_dir": plan.checkpoint_dir,
        },
    )
    started = time.perf_counter()
    result = train_and_evaluate(
        fexp,
        tracker,
        device=job.device,
        resume=holds_unfinished_run(default_checkpoint_path(fexp)),
        evaluate_test=True,
        run_name=f"{loss}-final-seed{seed}",
        tags=plan.tags,
        parent_run_id=plan.parent_run_id,
        bundle=bundle,
        progress=False,
    )
    if log:
        metrics = result.test_metrics
        log(
            f"[final] {loss:<16} seed {seed}: test MAP@R {metrics.get(TEST_MAP_AT_R, float('nan')):.4f}"
            f" | R@1 {metrics.get(TEST_RECALL_AT_1, float('nan')):.4f} | "
            f"{format_seconds(time.perf_counter() - started)}"
        )
    return FinalRun(loss, seed, result.run_id, result.test_metrics, False)
