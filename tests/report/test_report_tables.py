"""Table numbers against mean and t-interval recomputed here from the metrics MLflow hands back."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from bench.report import runs as report_runs
from bench.report import tables
from bench.report.significance import compare_to_reference
from bench.report.tables import (
    display_name,
    mean_ci95,
    metric_label,
    significance_markdown,
    to_csv,
)


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
    # the two runs trained for real log clustering metrics; the synthetic ones do not
    assert {"test/nmi", "test/ami", "test/f1"} <= set(keys)
    for loss, runs in grouped.items():
        assert table.loc[loss, "n_seeds"] == len(runs)
        for key in keys:
            metric = key[len("test/") :]
            values = [r.data.metrics[key] for r in runs if key in r.data.metrics]
            if not values:
                assert math.isnan(table.loc[loss, f"{metric}_mean"])
                continue
            mean, ci = expected_stats(values)
            assert table.loc[loss, f"{metric}_mean"] == pytest.approx(mean, rel=1e-5)
            if math.isnan(ci):
                assert math.isnan(table.loc[loss, f"{metric}_ci95"])
            else:
                assert table.loc[loss, f"{metric}_ci95"] == pytest.approx(ci, rel=1e-5)
            reference = expected_stats(
                [r.data.metrics[key] for r in grouped["smooth_ap"] if key in r.data.metrics]
            )[0]
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


def test_significance_equals_scipy_welch_on_the_final_runs(store):
    """compare_to_reference over the report's reader, against scipy on metrics read straight from MLflow."""
    table = compare_to_reference(report_runs.final_runs(report_runs.open_store(store.uri, store.experiment)))
    grouped = runs_by_loss(store, "final")
    checked = 0
    for row in table.itertuples():
        key = f"test/{row.metric}"
        x = [r.data.metrics[key] for r in grouped[row.loss] if key in r.data.metrics]
        y = [r.data.metrics[key] for r in grouped["smooth_ap"] if key in r.data.metrics]
        if not x:  # contrastive's synthetic run logs no clustering metrics
            assert math.isnan(row.diff) and math.isnan(row.p)
            continue
        assert row.diff == pytest.approx(np.mean(x) - np.mean(y), abs=1e-12)
        if len(x) < 2 or len(y) < 2:
            assert math.isnan(row.p) and math.isnan(row.ci_low) and not row.separated
            continue
        expected = stats.ttest_ind(x, y, equal_var=False)
        assert row.p == pytest.approx(expected.pvalue, rel=1e-9)
        interval = expected.confidence_interval(0.95)
        assert (row.ci_low, row.ci_high) == pytest.approx((interval.low, interval.high), rel=1e-9)
        checked += 1
    # triplet (3 seeds) against Smooth-AP (3) on the six retrieval metrics; only the two runs trained for real
    # log clustering metrics, one per loss: no test there
    assert checked == 6


def significance_frame() -> pd.DataFrame:
    rng = np.random.default_rng(4)
    rows = [
        {"loss": loss, "dataset": "cub200", "seed": seed, "test/map_at_r": value, "test/nmi": value + 0.3}
        for loss, values in {
            "smooth_ap": rng.normal(0.40, 0.01, 3),
            "triplet": rng.normal(0.30, 0.01, 3),
            "fastap": rng.normal(0.405, 0.02, 3),
            "contrastive": [0.35],
        }.items()
        for seed, value in enumerate(values)
    ]
    return compare_to_reference(pd.DataFrame(rows))


def test_significance_markdown_shows_the_frame_in_points():
    frame = significance_frame()
    lines = [line for line in significance_markdown(frame).splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[1:]
    ]
    assert len(cells) == len(frame) == 6
    for row, cell in zip(frame.itertuples(), cells, strict=True):
        assert (cell["Metric"], cell["Loss"], cell["vs"]) == (
            metric_label(row.metric),
            display_name(row.loss),
            "Smooth-AP",
        )
        assert cell["Δ"] == f"{100 * row.diff:+.1f}"
        if row.loss == "contrastive":  # one seed
            assert [cell[c] for c in ("95% interval", "p", "p (Holm)", "Separated", "Seeds needed")] == [
                "n/a"
            ] * 5
            continue
        assert cell["95% interval"] == f"[{100 * row.ci_low:+.1f}, {100 * row.ci_high:+.1f}]"
        assert float(cell["p"]) == pytest.approx(row.p, rel=1e-2)
        assert float(cell["p (Holm)"]) == pytest.approx(row.p_holm, rel=1e-2)
        assert cell["Separated"] == ("yes" if row.p_holm < 0.05 else "no")
        assert cell["Seeds needed"] == ("–" if row.separated else f"{row.seeds_needed:.0f}")
    assert {c["Loss"]: c["Separated"] for c in cells if c["Metric"] == "MAP@R"} == {
        "Contrastive": "n/a",
        "FastAP": "no",
        "Triplet": "yes",
    }


def test_significance_csv_round_trips():
    frame = significance_frame()
    back = pd.read_csv(io.StringIO(to_csv(frame)))
    assert list(back.columns) == list(frame.columns)
    pd.testing.assert_frame_equal(back, frame, check_dtype=False, rtol=1e-5)


def test_clustering_metrics_are_labelled_and_ordered():
    runs = pd.DataFrame(
        columns=[f"test/{m}" for m in ("f1", "nmi", "map_at_r", "ami", "recall_at_2", "r_precision")]
    )
    assert tables.test_metrics(runs) == ["recall_at_2", "map_at_r", "r_precision", "nmi", "ami", "f1"]
    assert [metric_label(m) for m in ("nmi", "ami", "f1")] == ["NMI", "AMI", "F1"]


def test_markdown_states_the_clustering_protocol_when_it_shows_clustering_metrics():
    summary = pd.DataFrame({"loss": ["smooth_ap"], "n_seeds": [1]})
    for metric, value in (("nmi", 0.9), ("map_at_r", 0.4)):
        summary[f"{metric}_mean"], summary[f"{metric}_ci95"] = value, math.nan
    with_nmi = tables.to_markdown(summary, ["map_at_r", "nmi"])
    assert "NMI (in the CSV): k-means with one cluster per class" in with_nmi and "k-means++" in with_nmi
    assert "k-means" not in tables.to_markdown(summary, ["map_at_r"])
