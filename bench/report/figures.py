"""Report figures, sized for a paper: 3.3 in (one column) or 6.9 in (two columns) wide, 8 pt text.

Every function returns a `matplotlib.figure.Figure` built without pyplot (no global state, nothing left
open); `save_figure` writes it as PNG and PDF, with the plotted numbers as CSV beside it when given.
Each loss keeps one colour in every figure (`loss_color`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bench.report.tables import display_name, metric_label

COLUMN_IN = 3.3
DOUBLE_IN = 6.9
_KNOWN = ["smooth_ap", "triplet", "contrastive", "multi_similarity", "fastap", "blackbox_ap"]
_PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "figure.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "lines.linewidth": 1.3,
    "lines.markersize": 4,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
}


def loss_color(loss: str) -> str:
    """The paper's six losses have fixed colours; any other loss gets a stable one from its name."""
    if loss in _KNOWN:
        return _PALETTE[_KNOWN.index(loss)]
    spare = _PALETTE[len(_KNOWN) :]
    return spare[sum(map(ord, loss)) % len(spare)]


@contextmanager
def paper_style():
    with matplotlib.rc_context(STYLE):
        yield


def save_figure(fig: Figure, out_dir: Path, stem: str, data: pd.DataFrame | None = None) -> list[Path]:
    """Write `stem.png` (200 dpi) and `stem.pdf`, and `stem.csv` with the plotted data when given."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    with paper_style():
        fig.savefig(paths[0], dpi=200)
        fig.savefig(paths[1])
    if data is not None:
        paths.append(out_dir / f"{stem}.csv")
        data.to_csv(paths[-1], index=False, float_format="%.6g")
    return paths


def _clip_percent(ax) -> None:
    """Metrics live in [0, 100] %: a wide interval must not stretch the axis past what a metric can be."""
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.0), min(high, 100.0))


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", wrap=True, color="0.35")


def _legend_below(fig: Figure, ax, n: int) -> None:
    ax.legend(
        loc="upper center",
        bbox_to_anchor=(0.5, -0.22),
        ncol=min(n, 3),
        frameon=False,
        handlelength=1.5,
        columnspacing=1.0,
    )


def recall_data(summary: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """What `recall_figure` plots: per loss and K, the test Recall@K mean and 95% CI half-width over seeds
    (fractions; CI NaN with a single seed) and the number of seeds."""
    ks = [int(m[len("recall_at_") :]) for m in metrics if m.startswith("recall_at_")]
    rows = [
        {
            "loss": row.loss,
            "k": k,
            "mean": getattr(row, f"recall_at_{k}_mean"),
            "ci95": getattr(row, f"recall_at_{k}_ci95"),
            "n_seeds": row.n_seeds,
        }
        for row in summary.itertuples()
        for k in ks
    ]
    return pd.DataFrame(rows, columns=["loss", "k", "mean", "ci95", "n_seeds"])


def recall_figure(summary: pd.DataFrame, metrics: list[str], dataset: str) -> Figure:
    """Test Recall@K against K per loss, error bars = 95% CI over seeds (none with a single seed)."""
    data = recall_data(summary, metrics)
    ks = sorted(data["k"].unique())
    with paper_style():
        fig = Figure(figsize=(COLUMN_IN, 2.6), layout="constrained")
        ax = fig.add_subplot()
        positions = np.arange(len(ks), dtype=float)
        width = 0.5 / max(len(summary), 1)
        for i, row in enumerate(summary.itertuples()):
            part = data[data["loss"] == row.loss].set_index("k").loc[ks]
            means = part["mean"].to_numpy(dtype=float) * 100
            cis = np.nan_to_num(part["ci95"].to_numpy(dtype=float) * 100)
            offset = (i - (len(summary) - 1) / 2) * width
            ax.errorbar(
                positions + offset,
                means,
                yerr=cis,
                marker="o",
                capsize=2,
                color=loss_color(row.loss),
                label=f"{display_name(row.loss)} (n={row.n_seeds})",
            )
        ax.set_xticks(positions, [str(k) for k in ks])
        _clip_percent(ax)
        ax.set_xlabel("K")
        ax.set_ylabel("test Recall@K (%)")
        ax.set_title(f"{dataset}: Recall@K, mean ± 95% CI over seeds")
        ax.grid(axis="y", alpha=0.3)
        _legend_below(fig, ax, len(summary))
    return fig


def curves_figure(
    histories: pd.DataFrame, ylabel: str, title: str, log_y: bool = False
) -> tuple[Figure, pd.DataFrame]:
    """Per loss, a metric over epochs: mean over seeds (line) and min-max over seeds (band).

    `histories` has columns loss, seed, step (0-based epoch), value. Returns the figure and the plotted data.
    """
    data = (
        histories.groupby(["loss", "step"])["value"]
        .agg(["mean", "min", "max", "count"])
        .reset_index()
        .rename(columns={"count": "n_seeds"})
    )
    data["epoch"] = data["step"] + 1
    with paper_style():
        fig = Figure(figsize=(COLUMN_IN, 2.6), layout="constrained")
        ax = fig.add_subplot()
        losses = sorted(data["loss"].unique(), key=lambda name: (name != "smooth_ap", name))
        for loss in losses:
            part = data[data["loss"] == loss]
            color = loss_color(loss)
            ax.plot(
                part["epoch"],
                part["mean"],
                color=color,
                marker="." if len(part) < 30 else None,
                label=display_name(loss),
            )
            ax.fill_between(part["epoch"], part["min"], part["max"], color=color, alpha=0.2, linewidth=0)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if data["epoch"].nunique() <= 12:
            ax.set_xticks(sorted(data["epoch"].unique()))
        _legend_below(fig, ax, len(losses))
    return fig, data[["loss", "epoch", "mean", "min", "max", "n_seeds"]]


def convergence_figure(history: pd.DataFrame) -> Figure:
    """Best validation MAP@R after each trial, one line per loss (`cost.best_so_far`): a line still
    rising at the last trial means the budget had not converged for that loss."""
    with paper_style():
        fig = Figure(figsize=(COLUMN_IN, 2.6), layout="constrained")
        ax = fig.add_subplot()
        for loss, part in history.groupby("loss", sort=False):
            ax.plot(
                part["trial"] + 1,
                part["best_so_far"],
                marker="o",
                ms=3,
                color=loss_color(loss),
                label=display_name(loss),
            )
        ax.set_xlabel("trials finished")
        ax.set_ylabel("best validation MAP@R")
        ax.set_title("tuning: best value after each trial")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _legend_below(fig, ax, history["loss"].nunique())
    return fig


def optuna_figure(study, loss: str) -> tuple[Figure, pd.DataFrame]:
    """Optimisation history (each complete trial, best so far) and parameter importances (fANOVA)."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    color = loss_color(loss)
    with paper_style():
        fig = Figure(figsize=(DOUBLE_IN, 2.3), layout="constrained")
        history, importance = fig.subplots(1, 2, width_ratios=[1.2, 1])
        history.set_xlabel("trial")
        history.set_ylabel("validation MAP@R")
        history.set_title(
            f"{display_name(loss)}: optimisation history ({len(complete)} complete of "
            f"{len(study.trials)} trials)"
        )
        if complete:
            numbers = np.array([t.number for t in complete])
            values = np.array([t.value for t in complete])
            best = np.maximum.accumulate(values) if maximize else np.minimum.accumulate(values)
            history.scatter(numbers, values, s=10, color=color, alpha=0.7, label="trial")
            history.step(numbers, best, where="post", color="0.2", label="best so far")
            history.legend(frameon=False, loc="lower right")
            history.xaxis.set_major_locator(MaxNLocator(integer=True))
            history.set_xlim(-0.5, max(int(numbers.max()), 1) + 0.5)  # one trial: still whole-number ticks
            history.grid(alpha=0.3)
        else:
            _note(history, "no complete trials")
        importance.set_xlabel("importance (fANOVA, sums to 1)")
        importance.set_ylabel("parameter")
        importance.set_title("parameter importance")
        scores = _importances(study, complete)
        if isinstance(scores, str):
            _note(importance, scores)
            importance.set_yticks([])
            scores = {}
        else:
            names = list(scores)[::-1]
            bars = importance.barh(names, [scores[n] for n in names], color=color)
            importance.bar_label(bars, fmt="%.2f", padding=2)
            importance.set_xlim(0, 1)
    data = pd.DataFrame({"trial": [t.number for t in complete], "value": [t.value for t in complete]})
    data["best_so_far"] = (
        (data["value"].cummax() if maximize else data["value"].cummin()) if len(data) else []
    )
    for name, score in scores.items():
        data[f"importance:{name}"] = score
    return fig, data


def _importances(study, complete: list) -> dict[str, float] | str:
    """Importances, or the reason they cannot be computed (shown in the figure instead)."""
    import optuna

    if len(complete) < 2:
        return f"importances need at least 2 complete trials\n(this study has {len(complete)})"
    varying = {name for name in complete[0].params if len({repr(t.params.get(name)) for t in complete}) > 1}
    if not varying:
        return "importances need parameters that vary\nacross complete trials"
    try:
        return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as error:
        return f"importances unavailable:\n{error}"


def temperature_figure(trials: pd.DataFrame, param: str) -> tuple[Figure, pd.DataFrame]:
    """Smooth-AP's validation MAP@R against its temperature over the complete tuning trials (log x)."""
    data = trials[(trials["state"] == "COMPLETE") & trials[param].notna()][["number", param, "value"]]
    data = data.rename(columns={param: "temperature", "value": "val_map_at_r"}).sort_values("temperature")
    with paper_style():
        fig = Figure(figsize=(COLUMN_IN, 2.4), layout="constrained")
        ax = fig.add_subplot()
        ax.scatter(data["temperature"], data["val_map_at_r"], s=14, color=loss_color("smooth_ap"))
        if len(data) and (data["temperature"] > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel("Smooth-AP temperature τ")
        ax.set_ylabel("validation MAP@R")
        ax.set_title(f"Smooth-AP tuning trials (n={len(data)})")
        ax.grid(alpha=0.3)
        if data.empty:
            _note(ax, "no complete trials with a temperature")
    return fig, data


def ablation_figure(table: pd.DataFrame, metric: str) -> Figure:
    """The test metric against the swept value, mean with a 95% CI band; one line per loss (and second
    value)."""
    param = str(table["param"].iloc[0])
    second = "value2" in table
    with paper_style():
        fig = Figure(figsize=(COLUMN_IN, 2.5), layout="constrained")
        ax = fig.add_subplot()
        groups = table.groupby(["loss", "value2"] if second else ["loss"], sort=True)
        styles = ["-", "--", ":", "-."]
        for i, (key, part) in enumerate(groups):
            key = key if isinstance(key, tuple) else (key,)
            part = part.sort_values("value")
            x = part["value"].to_numpy(dtype=float)
            mean = part[f"{metric}_mean"].to_numpy() * 100
            ci = np.nan_to_num(part[f"{metric}_ci95"].to_numpy()) * 100
            color = loss_color(key[0])
            label = display_name(key[0]) + (f", {part['param2'].iloc[0]}={key[1]:g}" if second else "")
            ax.plot(
                x,
                mean,
                marker="o",
                color=color,
                linestyle=styles[i % len(styles)] if second else "-",
                label=label,
            )
            ax.fill_between(x, mean - ci, mean + ci, color=color, alpha=0.2, linewidth=0)
        values = table["value"].to_numpy(dtype=float)
        if (values > 0).all() and values.max() / values.min() >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(param)
        ax.set_ylabel(f"test {metric_label(metric)} (%)")
        _clip_percent(ax)
        ax.set_title(f"ablation of {param.rsplit('.', 1)[-1]}: mean ± 95% CI")
        ax.grid(alpha=0.3)
        if groups.ngroups > 1:
            _legend_below(fig, ax, groups.ngroups)
    return fig


def is_blank(path: Path) -> bool:
    """True when a PNG has a single colour (nothing was drawn)."""
    from PIL import Image

    with Image.open(path) as image:
        extrema = image.convert("L").getextrema()
    return extrema[0] == extrema[1]
