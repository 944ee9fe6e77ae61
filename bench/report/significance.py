"""Are two losses separated? Welch's t-test over the final runs' seeds, Holm's correction when several losses
are compared with one reference, and a rough count of the seeds an unseparated difference would need.

Input: one dataset's final runs as `bench.report.runs.final_runs` returns them (one row per loss and seed, one
column `test/<metric>` per metric). For a loss x with n1 seeds (mean m1, sample variance s1², ddof=1) against
a loss y (n2, m2, s2²), per metric:

* difference d = m1 - m2; se² = s1²/n1 + s2²/n2; Welch-Satterthwaite degrees of freedom
  df = se⁴ / ((s1²/n1)² / (n1 - 1) + (s2²/n2)² / (n2 - 1)); t = d / se; two-sided p = 2 P(T_df > |t|);
  95% interval d ± t_{0.975, df} se.
* Holm: over the m comparisons of one metric (every loss against the reference), the p-values sorted
  p_(1) <= ... <= p_(m) are adjusted to max_{j <= i} min(1, (m - j + 1) p_(j)); NaN p-values are not
  counted in m.
* separated: Holm-adjusted p < 0.05.
* seeds needed (unseparated pairs only): the normal approximation for a two-sided test at alpha = 0.05 with
  power 0.8, n = 2 (z_{1-alpha/2} + z_{power})² s² / d² per loss, rounded up, with s² the pooled variance
  ((n1 - 1) s1² + (n2 - 1) s2²) / (n1 + n2 - 2) and d the observed difference; at least 2 (a t-test needs a
  variance); inf when d = 0. It ignores the t distribution's heavier tails and Holm's factor, so it is a lower
  estimate; the table never shows fewer seeds than one more than the pair has, since that many did not
  separate it.
* A loss with one seed, or no spread in either loss (se = 0), has no variance to test: interval, t, df and p
  are NaN, the pair is not separated and no seed count is given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from bench.report.runs import REFERENCE_LOSS
from bench.report.tables import SPLIT, metric_order, test_metrics

ALPHA = 0.05
POWER = 0.8
COLUMNS = [
    "metric",
    "loss",
    "other",
    "n",
    "n_other",
    "mean",
    "mean_other",
    "diff",
    "ci_low",
    "ci_high",
    "t",
    "df",
    "p",
    "p_holm",
    "separated",
    "seeds_needed",
]


@dataclass(frozen=True)
class Welch:
    diff: float
    ci_low: float
    ci_high: float
    t: float
    df: float
    p: float


def welch(x: np.ndarray, y: np.ndarray, confidence: float = 1 - ALPHA) -> Welch:
    """Welch's unequal-variance t-test of mean(x) - mean(y), with its confidence interval."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    diff = float(x.mean() - y.mean()) if len(x) and len(y) else math.nan
    if len(x) < 2 or len(y) < 2:
        return Welch(diff, math.nan, math.nan, math.nan, math.nan, math.nan)
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return Welch(diff, math.nan, math.nan, math.nan, math.nan, math.nan)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    t = diff / se
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return Welch(diff, diff - half, diff + half, t, df, float(2 * stats.t.sf(abs(t), df)))


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the input order; NaN stays NaN and is not counted."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, math.nan)
    finite = np.flatnonzero(~np.isnan(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    steps = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(steps)
    return adjusted


def seeds_to_separate(x: np.ndarray, y: np.ndarray, alpha: float = ALPHA, power: float = POWER) -> float:
    """Seeds per loss to separate the observed difference (see the module docstring); NaN if unknown."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or len(y) < 2:
        return math.nan
    diff = x.mean() - y.mean()
    if diff == 0:
        return math.inf
    pooled = ((len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1)) / (len(x) + len(y) - 2)
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float(max(2, math.ceil(2 * z**2 * pooled / diff**2)))


def _single_dataset(runs: pd.DataFrame) -> None:
    datasets = runs["dataset"].unique() if "dataset" in runs else []
    if len(datasets) > 1:
        raise ValueError(
            f"runs: comparisons are per dataset, got several: {', '.join(map(str, sorted(datasets)))}"
        )


def _metrics(runs: pd.DataFrame, metrics: list[str] | None) -> list[str]:
    if metrics is None:
        return test_metrics(runs)
    missing = [m for m in metrics if f"{SPLIT}{m}" not in runs]
    if missing:
        columns = ", ".join(SPLIT + m for m in missing)
        raise ValueError(f"metrics: the runs have no column {columns}")
    return sorted(metrics, key=metric_order)


def _values(runs: pd.DataFrame, loss: str, metric: str) -> np.ndarray:
    return runs.loc[runs["loss"] == loss, f"{SPLIT}{metric}"].dropna().to_numpy(dtype=float)


def _check_losses(runs: pd.DataFrame, *losses: str) -> None:
    present = set(runs["loss"])
    for loss in losses:
        if loss not in present:
            raise ValueError(f"loss {loss!r}: no final runs; the runs have {', '.join(sorted(present))}")


def _compare(runs: pd.DataFrame, pairs: list[tuple[str, str]], metrics: list[str]) -> pd.DataFrame:
    """One row per (metric, pair); Holm over the pairs of each metric."""
    rows = []
    for metric in metrics:
        block = []
        for loss, other in pairs:
            x, y = _values(runs, loss, metric), _values(runs, other, metric)
            mean, mean_other = (float(v.mean()) if len(v) else math.nan for v in (x, y))
            block.append(
                {
                    "metric": metric,
                    "loss": loss,
                    "other": other,
                    "n": len(x),
                    "n_other": len(y),
                    "mean": mean,
                    "mean_other": mean_other,
                    **asdict(welch(x, y)),
                    "seeds_needed": seeds_to_separate(x, y),
                }
            )
        for row, adjusted in zip(block, holm(np.array([r["p"] for r in block])), strict=True):
            row["p_holm"] = adjusted
            row["separated"] = bool(adjusted < ALPHA)
            if row["separated"] or math.isnan(adjusted):
                row["seeds_needed"] = math.nan
            else:  # the seeds it has did not separate it
                row["seeds_needed"] = max(row["seeds_needed"], max(row["n"], row["n_other"]) + 1)
        rows.extend(block)
    return pd.DataFrame(rows, columns=COLUMNS)


def compare_to_reference(
    runs: pd.DataFrame, reference: str = REFERENCE_LOSS, metrics: list[str] | None = None
) -> pd.DataFrame:
    """Every other loss against `reference` on each test metric (default: all the runs logged), Holm-adjusted
    over the losses of each metric. Columns: COLUMNS; `diff` is loss minus reference.
    """
    _single_dataset(runs)
    _check_losses(runs, reference)
    others = sorted(set(runs["loss"]) - {reference})
    return _compare(runs, [(loss, reference) for loss in others], _metrics(runs, metrics))


def compare_pair(runs: pd.DataFrame, loss: str, other: str, metrics: list[str] | None = None) -> pd.DataFrame:
    """`loss` against `other` on each test metric: one comparison per metric, so `p_holm` equals `p`."""
    _single_dataset(runs)
    _check_losses(runs, loss, other)
    if loss == other:
        raise ValueError(f"compare_pair: a loss against itself ({loss!r})")
    return _compare(runs, [(loss, other)], _metrics(runs, metrics))
