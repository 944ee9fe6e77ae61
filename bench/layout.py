"""Where things live: the default stores, the layout of `results/`, and how a tracking URI is chosen.

Every default path and URI is defined here once; config defaults, the CLI's help and the report read them.
"""

from __future__ import annotations

import os
from pathlib import Path

RESULTS = "results"
MLFLOW_URI = f"sqlite:///{RESULTS}/mlflow.db"
MLFLOW_ARTIFACTS = f"{RESULTS}/mlartifacts"
OPTUNA_STORAGE = f"sqlite:///{RESULTS}/optuna.db"
CHECKPOINTS = f"{RESULTS}/checkpoints"
SQLITE_PREFIX = "sqlite:///"


def sqlite_path(url: str) -> Path | None:
    """The database file of a `sqlite:///path` URL; None for any other URL (a server, PostgreSQL)."""
    return Path(url[len(SQLITE_PREFIX) :]) if url.startswith(SQLITE_PREFIX) else None


def missing_sqlite(url: str) -> bool:
    """Whether `url` names a SQLite file that does not exist (reading must not create an empty one)."""
    path = sqlite_path(url)
    return path is not None and not path.is_file()


def make_sqlite_folder(url: str) -> None:
    """Create the folder of a SQLite store, so a fresh checkout can write its first run."""
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def tracking_uri(explicit: str | None = None, configured: str | None = None) -> str:
    """The MLflow store: an explicit `--tracking-uri`, else MLFLOW_TRACKING_URI, else the config's, else
    ours."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or configured or MLFLOW_URI


def report_dir(experiment: str) -> Path:
    """Where the tables and figures of an experiment go."""
    return Path(RESULTS) / experiment


def grad_dir(experiment: str) -> Path:
    """Where the gradient analysis of an experiment goes."""
    return report_dir(experiment) / "grad"


def run_checkpoint(checkpoint_dir: str | Path, experiment: str, loss: str, seed: int) -> Path:
    """`<checkpoint_dir>/<experiment>/<loss>-seed<seed>/last.pt`: one file per training run."""
    return Path(checkpoint_dir) / experiment / f"{loss}-seed{seed}" / "last.pt"


def trial_dir(checkpoint_dir: str | Path, study: str, trial: int) -> Path:
    """A tuning trial's scratch folder (removed when the trial ends)."""
    return Path(checkpoint_dir) / "tune" / study / f"trial-{trial}"


def final_dir(checkpoint_dir: str | Path, study: str, trial: int) -> Path:
    """The checkpoints of the final-seed runs of a study's best trial."""
    return Path(checkpoint_dir) / "final" / study / f"trial-{trial}"


def ablation_dir(checkpoint_dir: str | Path, cell: str) -> Path:
    """The checkpoints of one ablation cell."""
    return Path(checkpoint_dir) / "ablation" / cell
