"""Tuning with MLflow: equal budgets, nested runs, final seeds, pruning, surplus trials, class-disjoint CV and
the recipe audit. Everything runs on a synthetic 16-class bundle (tests/helpers.py: tiny_bundle)."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from bench.config import ConfigError
from bench.tracking import Tracker
from bench.tune import LossTuner, TuneJob, budget_report, fold_bundle, open_storage, run_finals, tune_losses
from tests.helpers import tiny_bundle, tiny_experiment


def runs(tracker: Tracker, where: str):
    return tracker.client.search_runs([tracker.experiment_id], where, max_results=1000)


def test_studies_have_equal_budgets_nested_mlflow_runs_and_distinct_final_seeds(tmp_path, tracker):
    exp = tiny_experiment(tmp_path, trials=2, epochs=2)
    bundle = tiny_bundle()
    lines: list[str] = []
    summaries = tune_losses(
        TuneJob(exp, ["smooth_ap", "contrastive"], device="cpu"),
        tracker=tracker,
        bundle=bundle,
        log=lines.append,
    )

    budgets = budget_report(exp.tune.storage, exp.name, ["smooth_ap", "contrastive"]).set_index("loss")
    assert list(budgets["budget"]) == [2, 2] and list(budgets["finished"]) == [2, 2]
    assert list(budgets["study"]) == ["omniglot-smooth_ap", "omniglot-contrastive"]
    assert len([line for line in lines if line.startswith("[tune]")]) == 4
    assert all("best" in line and "left" in line for line in lines)

    for loss, param in (("smooth_ap", "temperature"), ("contrastive", "neg_margin")):
        name = f"omniglot-{loss}"
        (parent,) = runs(tracker, f"tags.stage = 'study' and tags.study = '{name}'")
        assert parent.data.params["loss"] == loss and parent.data.params["budget"] == "2"
        assert parent.data.params["sampler"] == "TPE" and parent.data.params["seed"] == "0"
        assert parent.info.status == "FINISHED"
        trial_runs = runs(tracker, f"tags.stage = 'trial' and tags.study = '{name}'")
        assert len(trial_runs) == 2
        assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parent.info.run_id}
        study = optuna.load_study(study_name=name, storage=exp.tune.storage)
        for trial in study.trials:
            (run,) = [r for r in trial_runs if r.data.tags["trial"] == str(trial.number)]
            # the params MLflow recorded are the ones Optuna suggested, and the trial's value is the run's
            # last MAP@R
            assert float(run.data.params[f"loss.params.{param}"]) == pytest.approx(trial.params[param])
            history = tracker.client.get_metric_history(run.info.run_id, "val/map_at_r")
            assert len(history) == 2 and run.data.tags["optuna.state"] == "COMPLETE"
            assert trial.value == pytest.approx(max(history, key=lambda m: m.step).value)
        assert summaries[loss].best_value == max(t.value for t in study.trials)

    again = tune_losses(TuneJob(exp, ["smooth_ap"], device="cpu"), tracker=tracker, bundle=bundle, log=None)
    assert again["smooth_ap"].complete == 2  # re-running a finished study adds nothing

    finals = run_finals(
        TuneJob(exp, ["smooth_ap"], device="cpu"),
        "smooth_ap",
        tracker=tracker,
        seeds=[1, 2],
        bundle=bundle,
        log=None,
    )
    final_runs = runs(tracker, "tags.stage = 'final'")
    assert sorted(r.data.params["seed"] for r in final_runs) == ["1", "2"]
    study = optuna.load_study(study_name="omniglot-smooth_ap", storage=exp.tune.storage)
    for run in final_runs:
        assert run.data.params["loss"] == "smooth_ap" and "test/map_at_r" in run.data.metrics
        assert float(run.data.params["loss.params.temperature"]) == pytest.approx(
            study.best_trial.params["temperature"]
        )
        assert run.data.params["train.epochs"] == "2" and run.info.status == "FINISHED"
    assert [f.test_metrics["test/map_at_r"] for f in finals] == [
        next(r for r in final_runs if r.data.params["seed"] == str(f.seed)).data.metrics["test/map_at_r"]
        for f in finals
    ]
    rerun = run_finals(
        TuneJob(exp, ["smooth_ap"], device="cpu"),
        "smooth_ap",
        tracker=tracker,
        seeds=[1, 2],
        bundle=bundle,
        log=None,
    )
    assert all(f.skipped for f in rerun) and len(runs(tracker, "tags.stage = 'final'")) == 2


def test_pruned_trials_count_towards_the_budget_and_are_marked_in_mlflow(tmp_path, tracker):
    exp = tiny_experiment(tmp_path, trials=2, epochs=3)
    always = optuna.pruners.ThresholdPruner(lower=2.0)  # MAP@R < 2 always: prune at the first reported epoch
    study = LossTuner(
        exp, open_storage(exp.tune.storage), tracker, tiny_bundle(), device="cpu", pruner=always
    )
    lines = [study.run_one(), study.run_one()]
    assert [line.state for line in lines] == ["PRUNED", "PRUNED"]
    assert study.status() == "done"
    for run in runs(tracker, "tags.stage = 'trial'"):
        assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "PRUNED"
        assert len(tracker.client.get_metric_history(run.info.run_id, "val/map_at_r")) == 1
    assert not list((tmp_path / "checkpoints" / "tune").glob("*/trial-*"))  # trial checkpoints are cleaned up


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test's own ask() calls stand in for workers
def test_a_trial_beyond_the_budget_is_failed_before_training(tmp_path):
    exp = tiny_experiment(tmp_path, trials=2)
    study = LossTuner(exp, open_storage(exp.tune.storage), None, tiny_bundle(), device="cpu")
    study.study.study.ask(), study.study.study.ask()  # two workers hold the whole budget
    assert study.status() == "wait"
    assert study.run_one() is None  # what a racing third worker gets
    third = study.study.study.trials[2]
    assert third.state == TrialState.FAIL and third.user_attrs["surplus"] and not third.params


def test_cross_validation_folds_are_class_disjoint_and_the_trial_value_is_their_mean(tmp_path, tracker):
    bundle = tiny_bundle()
    exp = tiny_experiment(tmp_path, trials=1, epochs=1, extra=["tune.cv_folds=2", "tune.pruner=none"])
    train_classes = set(bundle.train.labels)
    from bench.data.splits import class_folds

    for train_idx, val_idx in class_folds(bundle.train.labels, 2):
        fold = fold_bundle(bundle, train_idx, val_idx, exp)
        seen, held = set(fold.train.labels), set(fold.val.query.labels)
        assert seen | held == train_classes and not seen & held and fold.tests == []
        assert not fold.val.query.augment

    study = LossTuner(exp, open_storage(exp.tune.storage), tracker, bundle, device="cpu")
    line = study.run_one()
    (trial_run,) = runs(tracker, "tags.stage = 'trial'")
    fold_runs = runs(tracker, "tags.stage = 'cv_fold'")
    assert {r.data.tags["mlflow.parentRunId"] for r in fold_runs} == {trial_run.info.run_id}
    fold_values = [r.data.metrics["val/map_at_r"] for r in fold_runs]
    assert len(fold_values) == 2 and line.value == pytest.approx(np.mean(fold_values))


def test_continuing_a_study_with_another_recipe_is_refused(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    LossTuner(tiny_experiment(tmp_path, epochs=2), storage, None, tiny_bundle(), device="cpu")
    LossTuner(
        tiny_experiment(tmp_path, trials=5, epochs=2), storage, None, tiny_bundle(), device="cpu"
    )  # may grow
    with pytest.raises(ConfigError, match="other fixed settings"):
        LossTuner(tiny_experiment(tmp_path, epochs=3), storage, None, tiny_bundle(), device="cpu")
