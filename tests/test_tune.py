"""Tuning: equal budgets, MLflow nesting, final seeds, class-disjoint CV, and robustness to killed and parallel
workers. Everything runs on a synthetic 16-class bundle at 14 px (tests/tune_fixtures.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from bench.config import ConfigError
from bench.tracking import Tracker
from bench.tune import (
    LossStudy,
    TrialSeededTPE,
    budget_report,
    fold_bundle,
    open_storage,
    run_finals,
    run_main_job,
    suggest_shared,
    tune_losses,
    with_overrides,
)
from tests.tune_fixtures import tiny_bundle, tiny_experiment, tune_worker

REPO = Path(__file__).resolve().parent.parent


def runs(tracker: Tracker, where: str):
    return tracker.client.search_runs([tracker.experiment_id], where, max_results=1000)


def test_studies_have_equal_budgets_nested_mlflow_runs_and_distinct_final_seeds(tmp_path, tracking_uri):
    exp = tiny_experiment(tmp_path, trials=2, epochs=2)
    tracker = Tracker(tracking_uri, "tiny", str(tmp_path / "artifacts"))
    bundle = tiny_bundle()
    lines: list[str] = []
    summaries = tune_losses(
        exp, ["smooth_ap", "contrastive"], tracker=tracker, device="cpu", bundle=bundle, log=lines.append
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
            # the params MLflow recorded are the ones Optuna suggested, and the trial's value is the run's last MAP@R
            assert float(run.data.params[f"loss.params.{param}"]) == pytest.approx(trial.params[param])
            history = tracker.client.get_metric_history(run.info.run_id, "val/map_at_r")
            assert len(history) == 2 and run.data.tags["optuna.state"] == "COMPLETE"
            assert trial.value == pytest.approx(max(history, key=lambda m: m.step).value)
        assert summaries[loss].best_value == max(t.value for t in study.trials)

    again = tune_losses(exp, ["smooth_ap"], tracker=tracker, device="cpu", bundle=bundle, log=None)
    assert again["smooth_ap"].complete == 2  # re-running a finished study adds nothing

    finals = run_finals(
        exp, "smooth_ap", tracker=tracker, seeds=[1, 2], device="cpu", bundle=bundle, log=None
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
    rerun = run_finals(exp, "smooth_ap", tracker=tracker, seeds=[1, 2], device="cpu", bundle=bundle, log=None)
    assert all(f.skipped for f in rerun) and len(runs(tracker, "tags.stage = 'final'")) == 2


def test_pruned_trials_count_towards_the_budget_and_are_marked_in_mlflow(tmp_path, tracking_uri):
    exp = tiny_experiment(tmp_path, trials=2, epochs=3)
    tracker = Tracker(tracking_uri, "tiny", str(tmp_path / "artifacts"))
    always = optuna.pruners.ThresholdPruner(lower=2.0)  # MAP@R < 2 always: prune at the first reported epoch
    study = LossStudy(
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
    study = LossStudy(exp, open_storage(exp.tune.storage), None, tiny_bundle(), device="cpu")
    study.study.ask(), study.study.ask()  # two workers hold the whole budget
    assert study.status() == "wait"
    assert study.run_one() is None  # what a racing third worker gets
    third = study.study.trials[2]
    assert third.state == TrialState.FAIL and third.user_attrs["surplus"] and not third.params


def test_trial_seeded_sampler_is_reproducible_and_differs_between_trials():
    def first_two(sampler_a, sampler_b):
        study = optuna.create_study(direction="maximize")
        values = []
        for sampler in (sampler_a, sampler_b):  # a second process has its own sampler object
            study.sampler = sampler
            values.append(study.ask().suggest_float("x", 0.0, 1.0))
        return values

    one = first_two(TrialSeededTPE(7, 2), TrialSeededTPE(7, 2))
    two = first_two(TrialSeededTPE(7, 2), TrialSeededTPE(7, 2))
    assert one == two and one[0] != one[1]


def test_shared_space_entries_become_config_overrides(tmp_path):
    exp = tiny_experiment(tmp_path)
    space = {
        "optim.lr": {"low": "1e-4", "high": 1e-2, "log": True},
        "model.embedding_dim": {"choices": [8, 32]},
        "data.samples_per_class": {"low": 2, "high": 4},
    }
    trial = optuna.create_study().ask()
    values = suggest_shared(trial, space)
    dists = trial.distributions
    assert dists["optim.lr"].log and dists["optim.lr"].low == 1e-4
    assert isinstance(dists["data.samples_per_class"], optuna.distributions.IntDistribution)
    assert dists["model.embedding_dim"].choices == (8, 32)
    tuned = with_overrides(exp, values)
    assert (tuned.optim.lr, tuned.model.embedding_dim, tuned.data.samples_per_class) == (
        values["optim.lr"],
        values["model.embedding_dim"],
        values["data.samples_per_class"],
    )
    with pytest.raises(ConfigError, match="tune.shared_space.optim.lr"):
        suggest_shared(optuna.create_study().ask(), {"optim.lr": {"low": 1e-4, "hgih": 1e-2}})
    with pytest.raises(ConfigError, match="optim"):
        with_overrides(exp, {"optim.learning_rate": 0.1})


def test_cross_validation_folds_are_class_disjoint_and_the_trial_value_is_their_mean(tmp_path, tracking_uri):
    bundle = tiny_bundle()
    exp = tiny_experiment(tmp_path, trials=1, epochs=1, extra=["tune.cv_folds=2", "tune.pruner=none"])
    train_classes = set(bundle.train.labels)
    from bench.data.splits import class_folds

    for train_idx, val_idx in class_folds(bundle.train.labels, 2):
        fold = fold_bundle(bundle, train_idx, val_idx, exp)
        seen, held = set(fold.train.labels), set(fold.val.query.labels)
        assert seen | held == train_classes and not seen & held and fold.tests == []
        assert not fold.val.query.augment

    tracker = Tracker(tracking_uri, "tiny", str(tmp_path / "artifacts"))
    study = LossStudy(exp, open_storage(exp.tune.storage), tracker, bundle, device="cpu")
    line = study.run_one()
    (trial_run,) = runs(tracker, "tags.stage = 'trial'")
    fold_runs = runs(tracker, "tags.stage = 'cv_fold'")
    assert {r.data.tags["mlflow.parentRunId"] for r in fold_runs} == {trial_run.info.run_id}
    fold_values = [r.data.metrics["val/map_at_r"] for r in fold_runs]
    assert len(fold_values) == 2 and line.value == pytest.approx(np.mean(fold_values))


def _counts(storage: str, name: str) -> dict[TrialState, list]:
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    return {state: [t for t in trials if t.state == state] for state in TrialState}


def _worker(storage: str, workdir: Path, trials: int, epochs: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [
        sys.executable,
        "-m",
        "tests.tune_fixtures",
        storage,
        str(workdir),
        str(trials),
        str(epochs),
    ]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(condition, process: subprocess.Popen, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"worker exited early:\n{process.stdout.read()}")
        assert time.monotonic() < deadline, "worker made no progress"
        time.sleep(0.1)


def test_a_worker_killed_mid_trial_loses_nothing_and_the_rerun_completes_the_budget(tmp_path):
    storage, name = f"sqlite:///{tmp_path / 'optuna.db'}", "omniglot-contrastive"
    worker = _worker(storage, tmp_path, 3, 4)

    def one_done_one_running() -> bool:
        try:
            counts = _counts(storage, name)
        except Exception:  # the worker has not created the database or the study yet
            return False
        return len(counts[TrialState.COMPLETE]) >= 1 and len(counts[TrialState.RUNNING]) == 1

    _wait_for(one_done_one_running, worker)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    before = _counts(storage, name)
    assert len(before[TrialState.RUNNING]) == 1, "the kill landed between two trials"
    killed = before[TrialState.RUNNING][0].number
    completed = {t.number: (t.params, t.value) for t in before[TrialState.COMPLETE]}

    tune_worker(storage, tmp_path, 3, 4)  # the same command again (in this process: no second start-up)
    after = _counts(storage, name)
    assert {
        t.number: (t.params, t.value) for t in after[TrialState.COMPLETE] if t.number in completed
    } == completed
    assert len(after[TrialState.COMPLETE]) == 3 and not after[TrialState.RUNNING]
    assert [t.number for t in after[TrialState.FAIL]] == [killed]


def test_two_workers_share_one_study_and_finish_the_budget_together(tmp_path):
    storage, name, budget = f"sqlite:///{tmp_path / 'optuna.db'}", "omniglot-contrastive", 4
    other = _worker(storage, tmp_path, budget, 2)

    def other_has_started_a_trial() -> bool:
        try:
            return len(_counts(storage, name)[TrialState.RUNNING]) == 1
        except Exception:  # the worker has not created the database or the study yet
            return False

    _wait_for(other_has_started_a_trial, other)
    tune_worker(storage, tmp_path, budget, 2)  # this test's process joins as the second worker
    output, _ = other.communicate(timeout=180)
    assert other.returncode == 0, output
    counts = _counts(storage, name)
    complete = counts[TrialState.COMPLETE]
    assert len(complete) == budget and not counts[TrialState.RUNNING]
    assert all(
        t.user_attrs.get("surplus") for t in counts[TrialState.FAIL]
    )  # only lost races, never training
    assert len({tuple(sorted(t.params.items())) for t in complete}) == budget  # no configuration ran twice
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both workers did part of the work


def test_a_study_name_with_several_losses_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="exactly one loss"):
        tune_losses(tiny_experiment(tmp_path), ["smooth_ap", "triplet"], study_name_override="x", log=None)


def test_the_main_job_tunes_every_loss_runs_final_seeds_and_then_reports(tmp_path, tracking_uri):
    exp = tiny_experiment(tmp_path, trials=1, epochs=1, extra=["tune.final_seeds=1"])
    tracker = Tracker(tracking_uri, "tiny", str(tmp_path / "artifacts"))
    seen = []

    def report(result):
        seen.append(result)
        return [tmp_path / "report.md"]

    result = run_main_job(
        exp,
        ["smooth_ap", "fastap"],
        tracker=tracker,
        device="cpu",
        bundle=tiny_bundle(),
        log=None,
        after=report,
    )
    assert result.complete and seen == [result] and result.report_files == [tmp_path / "report.md"]
    assert list(result.budgets["finished"]) == [1, 1]
    assert {loss: [f.seed for f in finals] for loss, finals in result.finals.items()} == {
        "smooth_ap": [1],
        "fastap": [1],
    }
    assert sorted(r.data.params["loss"] for r in runs(tracker, "tags.stage = 'final'")) == [
        "fastap",
        "smooth_ap",
    ]


def test_continuing_a_study_with_another_recipe_is_refused(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    LossStudy(tiny_experiment(tmp_path, epochs=2), storage, None, tiny_bundle(), device="cpu")
    LossStudy(
        tiny_experiment(tmp_path, trials=5, epochs=2), storage, None, tiny_bundle(), device="cpu"
    )  # budget may grow
    with pytest.raises(ConfigError, match="other fixed settings"):
        LossStudy(tiny_experiment(tmp_path, epochs=3), storage, None, tiny_bundle(), device="cpu")
