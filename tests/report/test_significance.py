"""bench.report.significance against scipy's Welch test, a Welch interval written out here, and hand-worked
Holm adjustments and seed counts."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench.report.significance import COLUMNS, compare_pair, compare_to_reference, holm, welch

METRICS = ("recall_at_1", "map_at_r")


def final_runs(samples: dict[str, dict[str, list[float]]], dataset: str = "cub200") -> pd.DataFrame:
    """Shaped like runs.final_runs: one row per (loss, seed), one `test/<metric>` column per metric."""
    rows = []
    for loss, per_metric in samples.items():
        seeds = len(next(iter(per_metric.values())))
        for seed in range(seeds):
            row = {"run_id": f"{loss}-{seed}", "loss": loss, "dataset": dataset, "seed": seed}
            row.update({f"test/{metric}": values[seed] for metric, values in per_metric.items()})
            rows.append(row)
    return pd.DataFrame(rows)


def random_samples(rng: np.random.Generator) -> dict[str, dict[str, list[float]]]:
    """Four losses with different seed counts, means and spreads; multi_similarity far above the others."""
    shapes = {"smooth_ap": (5, 0.60, 0.01), "triplet": (3, 0.58, 0.03), "fastap": (4, 0.595, 0.005)}
    shapes["multi_similarity"] = (6, 0.70, 0.01)
    return {
        loss: {m: list(rng.normal(mean, spread, size=n)) for m in METRICS}
        for loss, (n, mean, spread) in shapes.items()
    }


def welch_interval(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Written out: d +- t_{0.975, df} se, se^2 = s1^2/n1 + s2^2/n2, Welch-Satterthwaite df."""
    n1, n2 = len(x), len(y)
    s1 = sum((v - sum(x) / n1) ** 2 for v in x) / (n1 - 1)
    s2 = sum((v - sum(y) / n2) ** 2 for v in y) / (n2 - 1)
    se2 = s1 / n1 + s2 / n2
    df = se2**2 / ((s1 / n1) ** 2 / (n1 - 1) + (s2 / n2) ** 2 / (n2 - 1))
    d = sum(x) / n1 - sum(y) / n2
    half = stats.t.ppf(0.975, df) * math.sqrt(se2)
    return d - half, d + half


def holm_by_definition(p: list[float]) -> list[float]:
    """Holm by its definition: the i-th smallest gets max over j <= i of min(1, (m - j + 1) p_(j))."""
    m = len(p)
    ranked = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    for i, index in enumerate(ranked):
        adjusted[index] = max(min(1.0, (m - j) * p[ranked[j]]) for j in range(i + 1))
    return adjusted


def test_against_smooth_ap_equals_scipy_welch():
    samples = random_samples(np.random.default_rng(0))
    table = compare_to_reference(final_runs(samples))
    assert list(table.columns) == COLUMNS
    assert sorted(zip(table["metric"], table["loss"], strict=True)) == sorted(
        (m, loss) for m in METRICS for loss in ("fastap", "multi_similarity", "triplet")
    )
    for row in table.itertuples():
        x, y = np.array(samples[row.loss][row.metric]), np.array(samples["smooth_ap"][row.metric])
        expected = stats.ttest_ind(x, y, equal_var=False)
        assert row.other == "smooth_ap" and (row.n, row.n_other) == (len(x), len(y))
        assert row.diff == pytest.approx(x.mean() - y.mean(), abs=1e-15)
        assert row.t == pytest.approx(expected.statistic, rel=1e-12)
        assert row.p == pytest.approx(expected.pvalue, rel=1e-12)
        assert row.df == pytest.approx(expected.df, rel=1e-12)
        assert (row.ci_low, row.ci_high) == pytest.approx(welch_interval(x, y), rel=1e-12)
        interval = expected.confidence_interval(0.95)
        assert (row.ci_low, row.ci_high) == pytest.approx((interval.low, interval.high), rel=1e-12)


def test_holm_over_the_losses_of_each_metric():
    table = compare_to_reference(final_runs(random_samples(np.random.default_rng(1))))
    for _, block in table.groupby("metric"):
        assert len(block) == 3  # corrected for the three comparisons of that metric, not for all six
        expected = holm_by_definition(list(block["p"]))
        assert list(block["p_holm"]) == pytest.approx(expected, rel=1e-12)
        assert list(block["separated"]) == [p < 0.05 for p in expected]
    separated = table.set_index(["metric", "loss"])["separated"]
    assert separated[("map_at_r", "multi_similarity")] and not separated[("map_at_r", "fastap")]


def test_holm_can_unseparate_a_pair_below_alpha():
    # Triplet sits 0.027 above Smooth-AP (same spread, 3 seeds each): t = 0.027 / 0.008165 = 3.31 on 4 degrees
    # of freedom, p = 0.030 < 0.05 alone; the two other losses are 0.001 off (large p), so Holm multiplies the
    # smallest p by m = 3: 0.089, not separated. Asked for alone, the same pair is separated.
    reference = [0.50, 0.51, 0.52]
    runs = final_runs(
        {
            "smooth_ap": {"map_at_r": reference},
            "triplet": {"map_at_r": [v + 0.027 for v in reference]},
            "fastap": {"map_at_r": [v + 0.001 for v in reference]},
            "contrastive": {"map_at_r": [v - 0.001 for v in reference]},
        }
    )
    triplet = compare_to_reference(runs).set_index("loss").loc["triplet"]
    assert triplet["p"] == pytest.approx(0.0298, abs=5e-4)
    assert triplet["p_holm"] == pytest.approx(3 * triplet["p"], rel=1e-12)
    # pooled variance 1e-4: n = 2 x 7.848880 x 1e-4 / 0.027^2 = 2.15 -> 3 (the formula knows no Holm factor),
    # but 3 seeds did not separate the pair: at least 4
    assert not triplet["separated"] and triplet["seeds_needed"] == 4
    assert compare_pair(runs, "triplet", "smooth_ap")["separated"].all()


def test_holm_hand_worked():
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4). Ascending: 0.005, 0.01, 0.03, 0.04.
    # times m - j + 1: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> running max
    # 0.06.
    # In the input order: 0.03, 0.06, 0.06, 0.02.
    assert holm(np.array([0.01, 0.04, 0.03, 0.005])) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    # NaN is not a comparison: m = 3. 0.02 x 3 = 0.06, 0.3 x 2 = 0.6, 0.6 x 1 = 0.6.
    got = holm(np.array([0.3, np.nan, 0.02, 0.6]))
    assert math.isnan(got[1]) and [got[0], got[2], got[3]] == pytest.approx([0.6, 0.06, 0.6], abs=1e-15)
    # capped at 1: 0.6 x 2 = 1.2 -> 1, then 0.7 x 1 = 0.7 -> running max 1.
    assert holm(np.array([0.7, 0.6])) == pytest.approx([1.0, 1.0], abs=1e-15)
    assert holm_by_definition([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_seeds_needed_hand_worked():
    # Smooth-AP 0.48, 0.50, 0.52 (mean 0.50, variance 0.0004); triplet 0.49, 0.51, 0.53 (mean 0.51, 0.0004):
    # pooled variance 0.0004, d = 0.01. z_0.975 = 1.959964, z_0.8 = 0.841621, (sum)^2 = 7.848880.
    # n = 2 x 7.848880 x 0.0004 / 0.0001 = 62.79 -> 63 seeds per loss.
    # Contrastive 0.47, 0.50, 0.53 has Smooth-AP's mean: d = 0, no number of seeds separates it.
    # FastAP sits 0.2 above: separated, so no seed count.
    runs = final_runs(
        {
            "smooth_ap": {"map_at_r": [0.48, 0.50, 0.52]},
            "triplet": {"map_at_r": [0.49, 0.51, 0.53]},
            "contrastive": {"map_at_r": [0.47, 0.50, 0.53]},
            "fastap": {"map_at_r": [0.69, 0.70, 0.71]},
        }
    )
    table = compare_to_reference(runs).set_index("loss")
    assert not table.loc["triplet", "separated"] and table.loc["triplet", "seeds_needed"] == 63
    assert not table.loc["contrastive", "separated"] and table.loc["contrastive", "seeds_needed"] == math.inf
    assert table.loc["fastap", "separated"] and math.isnan(table.loc["fastap", "seeds_needed"])


def test_one_seed_gives_nan_not_a_crash():
    runs = final_runs(
        {
            "smooth_ap": {"map_at_r": [0.48, 0.50, 0.52]},
            "contrastive": {"map_at_r": [0.3]},
            "triplet": {"map_at_r": [0.40, 0.41, 0.43]},
        }
    )
    table = compare_to_reference(runs).set_index("loss")
    row = table.loc["contrastive"]
    assert row["diff"] == pytest.approx(0.3 - 0.5)
    for column in ("ci_low", "ci_high", "t", "df", "p", "p_holm", "seeds_needed"):
        assert math.isnan(row[column]), column
    assert not row["separated"]
    # the comparison without a p-value does not count in Holm's m: triplet is adjusted as the only one
    assert table.loc["triplet", "p_holm"] == pytest.approx(table.loc["triplet", "p"], rel=1e-12)


def test_no_spread_in_either_loss_gives_nan():
    assert math.isnan(welch(np.array([0.5, 0.5]), np.array([0.6, 0.6])).p)


def test_missing_values_are_left_out():
    runs = final_runs({"smooth_ap": {"nmi": [0.8, 0.82, np.nan]}, "triplet": {"nmi": [0.7, 0.71, 0.69]}})
    row = compare_to_reference(runs).iloc[0]
    expected = stats.ttest_ind([0.7, 0.71, 0.69], [0.8, 0.82], equal_var=False)
    assert (row["n"], row["n_other"]) == (3, 2)
    assert row["p"] == pytest.approx(expected.pvalue, rel=1e-12)


def test_any_pair_on_request():
    samples = random_samples(np.random.default_rng(2))
    table = compare_pair(final_runs(samples), "fastap", "triplet")
    assert list(table["metric"]) == ["recall_at_1", "map_at_r"]  # the tables' order
    for row in table.itertuples():
        x, y = samples["fastap"][row.metric], samples["triplet"][row.metric]
        expected = stats.ttest_ind(x, y, equal_var=False)
        assert (row.loss, row.other) == ("fastap", "triplet")
        assert row.t == pytest.approx(expected.statistic, rel=1e-12)
        assert row.p == row.p_holm == pytest.approx(expected.pvalue, rel=1e-12)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda runs: compare_pair(runs, "fastap", "arcface"), "loss 'arcface': no final runs"),
        (lambda runs: compare_pair(runs, "fastap", "fastap"), "a loss against itself"),
        (lambda runs: compare_to_reference(runs, reference="arcface"), "loss 'arcface'"),
        (lambda runs: compare_to_reference(runs, metrics=["nmi"]), "no column test/nmi"),
        (
            lambda runs: compare_to_reference(
                pd.concat([runs, final_runs({"triplet": {"map_at_r": [0.1]}}, "sop")])
            ),
            "several: cub200, sop",
        ),
    ],
)
def test_bad_input_names_what_is_wrong(call, match):
    with pytest.raises(ValueError, match=match):
        call(final_runs(random_samples(np.random.default_rng(3))))
