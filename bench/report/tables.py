"""Comparison tables: mean and 95% confidence interval over seeds, as Markdown, LaTeX (booktabs) and CSV.

Convention: the interval is Student's t, mean +- t_{0.975, n-1} * s / sqrt(n) with s the sample standard
deviation (ddof=1) over n seeds. With a single seed it is undefined: NaN in the CSV, "n/a" in the text tables.
The CSV holds fractions; Markdown and LaTeX show percentage points with one decimal.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from bench.clustering import KMEANS_PROTOCOL
from bench.report.console import metric_order
from bench.report.runs import REFERENCE_LOSS

DISPLAY_NAMES = {
    "smooth_ap": "Smooth-AP",
    "triplet": "Triplet",
    "contrastive": "Contrastive",
    "multi_similarity": "Multi-Similarity",
    "fastap": "FastAP",
    "blackbox_ap": "Blackbox AP",
    "roadmap": "ROADMAP",
    "recall_at_k": "RS@k",  # the Recall@k surrogate, as its authors abbreviate it
    "pnp": "PNP",
}
SPLIT = "test/"
INTERVAL = (
    "mean ± 95% confidence interval over seeds, in percentage points (Student's t: "
    "t_{0.975,n-1}·s/√n; n/a with a single seed)"
)
CONVENTION = f"{INTERVAL}; best mean in bold; in parentheses: difference of the mean to Smooth-AP, in points"


def display_name(loss: str) -> str:
    return DISPLAY_NAMES.get(loss, loss)


CLUSTERING_METRICS = ("nmi", "ami", "f1")
LABELS = {
    "map_at_r": "MAP@R",
    "r_precision": "R-Prec",
    "coarse_recall_at_1": "Coarse R@1",
    "coarse_map_at_r": "Coarse MAP@R",
    "nmi": "NMI",
    "ami": "AMI",
    "f1": "F1",
}
COARSE = ("coarse_recall_at_1", "coarse_map_at_r")  # logged by datasets with two label levels (Grocery Store)


def metric_label(metric: str) -> str:
    """`recall_at_4` -> `R@4`, `map_at_r` -> `MAP@R`, `r_precision` -> `R-Prec`, `nmi` -> `NMI`, ..."""
    if metric.startswith("recall_at_"):
        return f"R@{metric[len('recall_at_') :]}"
    return LABELS.get(metric, metric)


def test_metrics(runs: pd.DataFrame) -> list[str]:
    """Metric names (no `test/` prefix) the runs logged for the headline test split, in table order."""
    names = [c[len(SPLIT) :] for c in runs.columns if c.startswith(SPLIT)]
    return sorted(names, key=metric_order)


def display_metrics(metrics: list[str]) -> list[str]:
    """The paper's columns: Recall@K and MAP@R, then the coarse-label ones where logged (R-Precision stays in
    the CSV)."""
    return [m for m in metrics if m.startswith("recall_at_") or m == "map_at_r" or m in COARSE]


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); half-width NaN for fewer than two values."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    if n < 2:
        return mean, math.nan
    return mean, float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def summarize(
    runs: pd.DataFrame, metrics: list[str], prefix: str = SPLIT, by: list[str] | None = None
) -> pd.DataFrame:
    """One row per group (default: per loss) with `<metric>_mean`, `<metric>_ci95` and `n_seeds`.

    Losses are ordered with Smooth-AP first, then by registry name.
    """
    by = by or ["loss"]
    rows = []
    for key, group in runs.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key, strict=True))
        row["n_seeds"] = len(group)
        for metric in metrics:
            column = f"{prefix}{metric}"
            values = group[column].to_numpy(dtype=float) if column in group else np.array([])
            row[f"{metric}_mean"], row[f"{metric}_ci95"] = mean_ci95(values)
        rows.append(row)
    table = pd.DataFrame(rows)
    if "loss" in by:
        table["_first"] = table["loss"] != REFERENCE_LOSS
        table = table.sort_values(["_first", *by], kind="stable").drop(columns="_first")
    return table.reset_index(drop=True)


def add_differences(
    summary: pd.DataFrame, metrics: list[str], reference: str = REFERENCE_LOSS
) -> pd.DataFrame:
    """Add `<metric>_diff_<reference>` = mean - the reference loss's mean (NaN without the reference)."""
    table = summary.copy()
    ref = table[table["loss"] == reference]
    for metric in metrics:
        base = float(ref[f"{metric}_mean"].iloc[0]) if len(ref) else math.nan
        table[f"{metric}_diff_{reference}"] = table[f"{metric}_mean"] - base
    return table


def comparison_table(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Summary of one dataset's final runs with differences to Smooth-AP, and its test metrics."""
    metrics = test_metrics(runs)
    if not metrics:
        raise ValueError(f"the final runs log no `{SPLIT}` metrics (run ids: {', '.join(runs['run_id'])})")
    return add_differences(summarize(runs, metrics), metrics), metrics


def _best(summary: pd.DataFrame, metric: str) -> pd.Series:
    means = summary[f"{metric}_mean"]
    return means == means.max()


def _cell_parts(row: pd.Series, metric: str, reference: str) -> tuple[str, str, str]:
    mean, ci = row[f"{metric}_mean"], row[f"{metric}_ci95"]
    value = "n/a" if math.isnan(mean) else f"{100 * mean:.1f}"
    interval = "n/a" if math.isnan(ci) else f"{100 * ci:.1f}"
    diff = row.get(f"{metric}_diff_{reference}", math.nan)
    shift = "" if row["loss"] == reference or math.isnan(diff) else f"{100 * diff:+.1f}"
    return value, interval, shift


def to_markdown(summary: pd.DataFrame, metrics: list[str], reference: str = REFERENCE_LOSS) -> str:
    """A GitHub-flavoured Markdown table with the convention spelled out below it."""
    shown = display_metrics(metrics)
    header = ["Loss", *[metric_label(m) for m in shown], "Seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    best = {m: _best(summary, m) for m in shown}
    for index, row in summary.iterrows():
        cells = [display_name(row["loss"])]
        for metric in shown:
            value, interval, shift = _cell_parts(row, metric, reference)
            text = f"{value} ± {interval}"
            text = f"**{text}**" if best[metric][index] else text
            cells.append(f"{text} ({shift})" if shift else text)
        cells.append(str(row["n_seeds"]))
        lines.append("| " + " | ".join(cells) + " |")
    clustered = [metric_label(m) for m in metrics if m in CLUSTERING_METRICS]
    protocol = f" {', '.join(clustered)} (in the CSV): {KMEANS_PROTOCOL}." if clustered else ""
    return "\n".join(lines) + f"\n\n{CONVENTION}.{protocol}\n"


def _latex_escape(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")


def to_latex(summary: pd.DataFrame, metrics: list[str], reference: str = REFERENCE_LOSS) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); differences to Smooth-AP in small type."""
    shown = display_metrics(metrics)
    lines = [
        f"% {CONVENTION}",
        r"\begin{tabular}{l" + "r" * len(shown) + "c}",
        r"\toprule",
        " & ".join(["Loss", *[metric_label(m) for m in shown], "Seeds"]) + r" \\",
        r"\midrule",
    ]
    best = {m: _best(summary, m) for m in shown}
    for index, row in summary.iterrows():
        cells = [_latex_escape(display_name(row["loss"]))]
        for metric in shown:
            value, interval, shift = _cell_parts(row, metric, reference)
            text = f"{value} $\\pm$ {interval}"
            text = rf"\textbf{{{text}}}" if best[metric][index] else text
            cells.append(f"{text} {{\\scriptsize ({shift})}}" if shift else text)
        cells.append(str(row["n_seeds"]))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(summary: pd.DataFrame) -> str:
    """Machine-readable: one row per loss (registry name), fractions, NaN written as an empty field."""
    return summary.to_csv(index=False, float_format="%.6g")


def ablation_table(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (loss, swept value[, second value]): mean and CI of `test/<metric>` over seeds, by value."""
    by = ["loss", "param", "value"]
    if "param2" in runs and runs["param2"].notna().any():
        by += ["param2", "value2"]
    table = summarize(runs, [metric], by=by)
    return table.sort_values(by, kind="stable").reset_index(drop=True)


def ablation_markdown(table: pd.DataFrame, metric: str) -> str:
    second = "value2" in table
    header = ["Loss", str(table["param"].iloc[0])] + ([str(table["param2"].iloc[0])] if second else [])
    header += [metric_label(metric), "Seeds"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] * (len(header) - 2) + ["---:"] * 2) + "|",
    ]
    for row in table.itertuples():
        mean, ci = getattr(row, f"{metric}_mean"), getattr(row, f"{metric}_ci95")
        cells = [display_name(row.loss), f"{row.value:g}" if isinstance(row.value, float) else str(row.value)]
        if second:
            cells.append(f"{row.value2:g}" if isinstance(row.value2, float) else str(row.value2))
        cells += [f"{100 * mean:.1f} ± {'n/a' if math.isnan(ci) else f'{100 * ci:.1f}'}", str(row.n_seeds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{metric_label(metric)} on the test split: {INTERVAL}.\n"


SIGNIFICANCE_CONVENTION = (
    "Δ: difference of the means over seeds (loss − other), in percentage points, with its 95% Welch interval "
    "(Welch–Satterthwaite degrees of freedom); p: two-sided Welch t-test; p (Holm): adjusted over the "
    "comparisons of each metric; separated: Holm p < 0.05; seeds needed: per loss, for the observed "
    "difference to be separated at α = 0.05 with power 0.8 (normal approximation, pooled variance); "
    "n/a: a loss with one seed or no spread"
)


def _p_text(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3g}"


def _verdict(row) -> tuple[str, str]:
    """(separated, seeds needed) as shown: n/a without a p-value, no seed count for a separated pair."""
    if math.isnan(row.p_holm):
        return "n/a", "n/a"
    if row.separated:
        return "yes", "–"
    return "no", "inf" if math.isinf(row.seeds_needed) else f"{row.seeds_needed:.0f}"


def significance_markdown(comparisons: pd.DataFrame) -> str:
    """The rows of `bench.report.significance.compare_to_reference` (or `compare_pair`) as Markdown; the CSV
    is `to_csv` of the same frame (fractions, `inf` and empty fields as they are).
    """
    header = ["Metric", "Loss", "vs", "Δ", "95% interval", "p", "p (Holm)", "Separated", "Seeds needed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] * 3 + ["---:"] * 6) + "|"]
    for row in comparisons.itertuples():
        no_interval = math.isnan(row.ci_low)
        interval = "n/a" if no_interval else f"[{100 * row.ci_low:+.1f}, {100 * row.ci_high:+.1f}]"
        cells = [
            metric_label(row.metric),
            display_name(row.loss),
            display_name(row.other),
            "n/a" if math.isnan(row.diff) else f"{100 * row.diff:+.1f}",
            interval,
            _p_text(row.p),
            _p_text(row.p_holm),
            *_verdict(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{SIGNIFICANCE_CONVENTION}.\n"
