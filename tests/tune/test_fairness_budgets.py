"""Tuning keeps its fairness promises: equal budgets under a timeout, the same trials when run again, and
trials that never evaluate the test split (issue 18's third planted bug must be refused by the report).
Everything runs on the synthetic 16-class bundle (tests/helpers.py: tiny_bundle)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bench.report import receipt
from bench.report.runs import final_runs
from bench.tune import LossTuner, TuneJob, budget_report, objective, run_finals, runner, tune_losses
from tests.helpers import tiny_bundle, tiny_experiment

LOSSES = ["smooth_ap", "triplet", "contrastive"]


def test_a_timeout_leaves_budgets_at_most_one_trial_apart_and_a_rerun_evens_them(tmp_path, monkeypatch):
    """Every trial takes 10 s on a fake clock, the timeout is 35 s: trials start at 0, 10, 20 and 30 s, taken
    round-robin over three losses, so the first loss gets 2 and the others 1; the rerun completes all."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(
        runner,
        "time",
        SimpleNamespace(monotonic=lambda: clock.now, perf_counter=time.perf_counter, sleep=time.sleep),
    )
    real_run_one = LossTuner.run_one

    def run_one_in_10s(self):
        line = real_run_one(self)
        clock.now += 10
        return line

    monkeypatch.setattr(LossTuner, "run_one", run_one_in_10s)
    exp = tiny_experiment(tmp_path, trials=2, epochs=1)
    bundle = tiny_bundle()
    lines: list[str] = []
    tune_losses(TuneJob(exp, LOSSES, device="cpu", timeout=35), bundle=bundle, log=lines.append)
    finished = budget_report(exp.tune.storage, exp.name, LOSSES).set_index("loss")["finished"]
    assert finished.to_dict() == {"smooth_ap": 2, "triplet": 1, "contrastive": 1}
    assert lines[-1].startswith("[tune] timeout after 35s")

    summaries = tune_losses(TuneJob(exp, LOSSES, device="cpu"), bundle=bundle, log=None)
    finished = budget_report(exp.tune.storage, exp.name, LOSSES).set_index("loss")["finished"]
    assert finished.to_dict() == dict.fromkeys(LOSSES, 2)
    assert all(s.done for s in summaries.values())


def trials_of(storage: str, name: str) -> list[tuple]:
    study = optuna.load_study(study_name=name, storage=storage)
    return [(t.number, t.state.name, t.params, t.value) for t in study.trials]


def test_one_study_run_twice_gives_the_same_trials(tmp_path):
    bundle = tiny_bundle()
    studies = []
    for attempt in ("first", "second"):  # fresh storages and checkpoints, the same seed
        exp = tiny_experiment(tmp_path / attempt, trials=3, epochs=2)
        tune_losses(TuneJob(exp, ["smooth_ap"], device="cpu"), bundle=bundle, log=None)
        studies.append(trials_of(exp.tune.storage, "omniglot-smooth_ap"))
    assert len(studies[0]) == 3
    assert len({repr(t[2]) for t in studies[0]}) == 3  # three different settings were tried
    assert studies[0] == studies[1]


def splits_by_stage(tracking_uri: str, experiment_id: str) -> dict[str, list[str]]:
    runs = MlflowClient(tracking_uri).search_runs([experiment_id], max_results=1000)
    found: dict[str, list[str]] = {}
    for run in runs:
        found.setdefault(run.data.tags["stage"], []).append(run.data.tags.get("fairness.splits"))
    return found


def test_tuning_runs_evaluate_validation_only_and_the_finals_share_their_receipt(
    tmp_path, tracker, tracking_uri
):
    exp = tiny_experiment(tmp_path, trials=2, epochs=1)
    bundle = tiny_bundle()
    tune_losses(
        TuneJob(exp, ["smooth_ap", "triplet"], device="cpu"), tracker=tracker, bundle=bundle, log=None
    )
    for loss in ("smooth_ap", "triplet"):
        run_finals(
            TuneJob(exp, [loss], device="cpu"), loss, tracker=tracker, seeds=[1], bundle=bundle, log=None
        )

    splits = splits_by_stage(tracking_uri, tracker.experiment_id)
    assert splits["trial"] == ["val"] * 4
    assert splits["final"] == ["val,test"] * 2
    fairness = receipt.read_receipt(tracker, final_runs(tracker))
    assert fairness.finals["init_hash"].nunique() == 1 and fairness.finals["batches_hash"].nunique() == 1
    assert receipt.enforce(fairness) == []


def test_trials_evaluated_on_the_test_split_are_refused(tmp_path, tracker, monkeypatch):
    """Issue 18's third planted bug: tuning trials evaluated with evaluate_test=True."""
    real_train = objective.train_and_evaluate
    monkeypatch.setattr(
        objective,
        "train_and_evaluate",
        lambda *args, **kwargs: real_train(*args, **{**kwargs, "evaluate_test": True}),
    )
    exp = tiny_experiment(tmp_path, trials=2, epochs=1)
    tune_losses(TuneJob(exp, ["smooth_ap"], device="cpu"), tracker=tracker, bundle=tiny_bundle(), log=None)
    no_finals = pd.DataFrame(columns=["run_id", "loss", "dataset", "seed"])
    fairness = receipt.read_receipt(tracker, no_finals)
    with pytest.raises(receipt.UnfairComparison) as refusal:
        receipt.enforce(fairness)
    trial_ids = [r.info.run_id for r in tracker.find_runs(tags={"stage": "trial"})]
    assert len(trial_ids) == 2 and all(run_id in str(refusal.value) for run_id in trial_ids)
    assert "evaluated val,test" in str(refusal.value)
