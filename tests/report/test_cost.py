"""Cost and tuning effort: best-so-far curves worked by hand, tuned-parameter counts and final-run cost from a
store, and the report writing them beside the significance of each difference."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bench.report import runs as report_runs
from bench.report.cost import best_so_far, cost_table


def hand_study() -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    dists = {
        "a": optuna.distributions.FloatDistribution(0, 1),
        "b": optuna.distributions.IntDistribution(1, 9),
    }
    for value, state, epochs in (
        (0.1, "COMPLETE", 3),
        (None, "PRUNED", 1),
        (0.3, "COMPLETE", 3),
        (None, "FAIL", 2),
        (0.2, "COMPLETE", 2),
    ):
        study.add_trial(
            optuna.trial.create_trial(
                params={"a": 0.5, "b": 3},
                distributions=dists,
                value=value,
                state=optuna.trial.TrialState[state],
                intermediate_values={epoch: 0.1 for epoch in range(epochs)},
            )
        )
    return study


def test_best_so_far_follows_the_complete_trials_in_order():
    history = best_so_far({"x": hand_study()})
    assert list(history["trial"]) == [0, 1, 2, 4]  # the failed trial is not part of the budget
    assert list(history["best_so_far"]) == [0.1, 0.1, 0.3, 0.3]
    assert np.isnan(history["value"].iloc[1])


def test_cost_table_reads_the_runs_and_counts_the_search(store):
    final = report_runs.final_runs(report_runs.open_store(store.uri, store.experiment))
    trained = final[final["batch_size"].notna()]  # the conftest's two real runs carry their config
    table = cost_table(trained, {"smooth_ap": hand_study()}).set_index("loss")
    client = MlflowClient(store.uri)
    for row in trained.itertuples():
        info = client.get_run(row.run_id).info
        assert table.loc[row.loss, "wall_s"] == pytest.approx((info.end_time - info.start_time) / 1000)
        assert table.loc[row.loss, "images_per_s"] == pytest.approx(
            client.get_run(row.run_id).data.metrics["images_per_s"]
        )
        assert table.loc[row.loss, "loss_ms"] > 0 and table.loc[row.loss, "batch_size"] == row.batch_size
    assert (table.loc["smooth_ap", "tuned_params"], table.loc["smooth_ap", "trials"]) == (2, 4)
    assert table.loc["smooth_ap", "tuning_epochs"] == 3 + 1 + 3 + 2  # the failed trial's 2 are not budget
    assert (table.loc["triplet", "tuned_params"], table.loc["triplet", "trials"]) == (0, 0)  # no study given


def test_the_report_writes_significance_cost_and_convergence(store, tmp_path):
    from bench.report import make_report

    written = {p.name for p in make_report(store.uri, store.experiment, tmp_path / "out", store.optuna)}
    assert {"cost_folder.md", "cost_folder.csv", "tuning_convergence.csv"} <= written
    cost = pd.read_csv(tmp_path / "out" / "cost_folder.csv")
    assert set(cost["loss"]) == set(
        report_runs.final_runs(report_runs.open_store(store.uri, store.experiment))["loss"]
    )
    significance = pd.read_csv(tmp_path / "out" / "significance_folder.csv")
    assert "smooth_ap" not in set(significance["loss"]) and not math.isnan(significance["diff"].iloc[0])
