"""Table numbers against mean and t-interval recomputed here from the metrics MLflow hands back."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from bench.report.tables import display_name, mean_ci95


def expected_stats(values: list[float]) -> tuple[float, float]:
    """Written out independently: mean +- t_{0.975, n-1} * s / sqrt(n); undefined (NaN) for n = 1."""
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)


def runs_by_loss(store, stage: str) -> dict[str, list]:
    client = MlflowClient(store.uri)
    experiment = client.get_experiment_by_name(store.experiment).experiment_id
    grouped: dict[str, list] = {}
    for run in client.search_runs([experiment], f"tags.stage = '{stage}'"):
        grouped.setdefault(run.data.params["loss"], []).append(run)
    return grouped


def test_csv_equals_independent_mean_and_interval(store, report_dir):
    table = pd.read_csv(report_dir / "comparison_folder.csv").set_index("loss")
    grouped = runs_by_loss(store, "final")
    assert sorted(table.index) == sorted(grouped) == ["contrastive", "smooth_ap", "triplet"]
    keys = sorted(
        {k for runs in grouped.values() for r in runs for k in r.data.metrics if k.startswith("test/")}
    )
    assert "test/map_at_r" in keys and "test/recall_at_8" in keys
    for loss, runs in grouped.items():
        assert table.loc[loss, "n_seeds"] == len(runs)
        for key in keys:
            mean, ci = expected_stats([r.data.metrics[key] for r in runs])
            metric = key[len("test/") :]
            assert table.loc[loss, f"{metric}_mean"] == pytest.approx(mean, rel=1e-5)
            if math.isnan(ci):
                assert math.isnan(table.loc[loss, f"{metric}_ci95"])
            else:
                assert table.loc[loss, f"{metric}_ci95"] == pytest.approx(ci, rel=1e-5)
            reference = expected_stats([r.data.metrics[key] for r in grouped["smooth_ap"]])[0]
            assert table.loc[loss, f"{metric}_diff_smooth_ap"] == pytest.approx(mean - reference, abs=1e-6)
    assert table.loc["smooth_ap", "n_seeds"] == 3  # the stray stage=trial run is not counted
    assert math.isnan(table.loc["contrastive", "map_at_r_ci95"])  # one seed: no interval


def markdown_cells(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    return {row[0].strip(): dict(zip(header, (c.strip() for c in row), strict=True)) for row in rows[1:]}


def test_markdown_and_latex_show_the_same_numbers_best_in_bold(store, report_dir):
    table = pd.read_csv(report_dir / "comparison_folder.csv").set_index("loss")
    markdown = markdown_cells((report_dir / "comparison_folder.md").read_text())
    latex = (report_dir / "comparison_folder.tex").read_text()
    assert [r"\toprule", r"\midrule", r"\bottomrule"] == re.findall(r"\\(?:top|mid|bottom)rule", latex)
    columns = {
        "R@1": "recall_at_1",
        "R@2": "recall_at_2",
        "R@4": "recall_at_4",
        "R@8": "recall_at_8",
        "MAP@R": "map_at_r",
    }
    for label, metric in columns.items():
        best = table[f"{metric}_mean"].idxmax()
        for loss in table.index:
            mean, ci = table.loc[loss, f"{metric}_mean"], table.loc[loss, f"{metric}_ci95"]
            number = f"{100 * mean:.1f} ± {'n/a' if math.isnan(ci) else f'{100 * ci:.1f}'}"
            cell = markdown[display_name(loss)][label]
            assert cell.startswith(f"**{number}**" if loss == best else number), (loss, label, cell)
            if loss != "smooth_ap":
                diff = 100 * (mean - table.loc["smooth_ap", f"{metric}_mean"])
                assert cell.endswith(f"({diff:+.1f})")
            latex_number = number.replace(" ± ", " $\\pm$ ")
            assert (rf"\textbf{{{latex_number}}}" in latex) == (loss == best)
    assert markdown["Contrastive"]["Seeds"] == "1" and "n/a" in markdown["Contrastive"]["MAP@R"]


def test_ablation_table_equals_independent_statistics(store, report_dir):
    table = pd.read_csv(report_dir / "ablation_loss_params_temperature.csv")
    client = MlflowClient(store.uri)
    experiment = client.get_experiment_by_name(store.experiment).experiment_id
    by_value: dict[float, list[float]] = {}
    for run in client.search_runs([experiment], "tags.stage = 'ablation'"):
        by_value.setdefault(float(run.data.params["ablation.value"]), []).append(
            run.data.metrics["test/map_at_r"]
        )
    assert sorted(table["value"]) == sorted(by_value)
    for row in table.itertuples():
        mean, ci = expected_stats(by_value[row.value])
        assert row.map_at_r_mean == pytest.approx(mean, rel=1e-5)
        assert row.map_at_r_ci95 == pytest.approx(ci, rel=1e-5)
        assert row.n_seeds == len(by_value[row.value])
    assert "loss.params.temperature" in (report_dir / "ablation_loss_params_temperature.md").read_text()


def test_interval_helper_matches_scipy_interval():
    values = np.array([0.31, 0.35, 0.29, 0.4])
    mean, half = mean_ci95(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert (mean - half, mean + half) == pytest.approx((low, high))
    assert math.isnan(mean_ci95(np.array([0.5]))[1])
