"""What each loss costs and how much it was tuned: training speed and wall time of its final runs (from
MLflow), its own forward+backward time at the runs' batch size (measured here), the number of hyperparameters
its search space tunes, and the best validation score after each trial (does the budget look converged?).

Equal trials are not equal search: one tuned parameter for Smooth-AP, four for multi-similarity.
"""

from __future__ import annotations

import time

import numpy as np
import optuna
import pandas as pd
import torch

import losses
from bench.report.tables import display_name

COLUMNS = [
    "loss",
    "images_per_s",
    "wall_s",
    "loss_ms",
    "batch_size",
    "tuned_params",
    "trials",
    "tuning_epochs",
]


def loss_time_ms(
    name: str, params: dict, batch_size: int, dim: int, per_class: int, repeats: int = 5
) -> float:
    """Median forward+backward time of loss `name` on one random batch of unit vectors (CPU, float32)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(batch_size // per_class).repeat_interleave(per_class)
    embeddings = torch.nn.functional.normalize(torch.randn(len(labels), dim, generator=generator), dim=1)
    loss = losses.get_loss(name, **params)
    times = []
    for _ in range(repeats + 1):  # the first pass warms up
        leaf = embeddings.clone().requires_grad_(True)
        started = time.perf_counter()
        loss(leaf, labels).backward()
        times.append(time.perf_counter() - started)
    return float(np.median(times[1:]) * 1000)


def best_so_far(studies: dict[str, optuna.Study]) -> pd.DataFrame:
    """Per loss and finished trial (in trial order): its value and the best COMPLETE value up to it."""
    rows = []
    for loss, study in studies.items():
        best = -np.inf
        for trial in sorted(study.trials, key=lambda t: t.number):
            if trial.state == optuna.trial.TrialState.COMPLETE:
                best = max(best, trial.value)
            if trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
                value = trial.value if trial.state == optuna.trial.TrialState.COMPLETE else np.nan
                rows.append(
                    {
                        "loss": loss,
                        "trial": trial.number,
                        "value": value,
                        "best_so_far": best if np.isfinite(best) else np.nan,
                    }
                )
    return pd.DataFrame(rows, columns=["loss", "trial", "value", "best_so_far"])


def cost_table(final: pd.DataFrame, studies: dict[str, optuna.Study], measure: bool = True) -> pd.DataFrame:
    """One row per loss of one dataset's final runs: mean images/s and wall seconds per final run, the loss's
    forward+backward milliseconds at the runs' batch size (`measure=False` leaves it NaN), and its tuning."""
    rows = []
    for loss, part in final.groupby("loss", sort=False):
        first = part.iloc[0]
        shape = [first.get(key) for key in ("batch_size", "embedding_dim", "per_class")]
        known = measure and all(pd.notna(v) for v in shape)  # runs logged by hand may lack the config
        study = studies.get(loss)
        finished = [t for t in study.trials if t.state.is_finished()] if study is not None else []
        budget = [t for t in finished if t.state.name in ("COMPLETE", "PRUNED")]
        rows.append(
            {
                "loss": loss,
                "images_per_s": _mean(part, "images_per_s"),
                "wall_s": _mean(part, "wall_s"),
                "loss_ms": loss_time_ms(loss, first["loss_params"], *map(int, shape)) if known else np.nan,
                "batch_size": shape[0],
                "tuned_params": max((len(t.distributions) for t in finished), default=0),
                "trials": len(budget),
                # each trial reports once per epoch (per fold with tune.cv_folds > 1), pruned ones fewer times
                "tuning_epochs": sum(len(t.intermediate_values) for t in budget),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


def _mean(part: pd.DataFrame, column: str) -> float:
    return float(pd.to_numeric(part[column], errors="coerce").mean()) if column in part else np.nan


def cost_markdown(table: pd.DataFrame) -> str:
    lines = [
        "| Loss | Train images/s | Wall time per final run | Loss fwd+bwd | Tuned parameters | Trials | "
        "Epochs trained in tuning |",
        "|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table.itertuples():
        ms = "n/a" if np.isnan(row.loss_ms) else f"{row.loss_ms:.2f} ms at B={row.batch_size}"
        lines.append(
            f"| {display_name(row.loss)} | {row.images_per_s:.0f} | {row.wall_s:.0f} s | {ms} | "
            f"{row.tuned_params} | {row.trials} | {row.tuning_epochs} |"
        )
    lines.append("")
    lines.append(
        "Images/s and wall time: means over the final runs (as logged, on the machine that ran them); "
        "loss time: median of 5 forward+backward passes on one random batch of the runs' size, on the "
        "CPU that made this report. Equal trials are not equal search: compare the tuned parameters, and "
        "the epochs the trials trained (a pruned trial stops early; with cross-validation, count folds)."
    )
    return "\n".join(lines) + "\n"
