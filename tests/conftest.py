"""Shared fixtures: a throwaway MLflow store and tracker per test, the synthetic bundle, telemetry off, few
threads on the shared CPU, Triton's CPU interpreter where there is no GPU. The builders behind them are in
tests/helpers.py."""

from __future__ import annotations

import os
import shutil

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
if not torch.cuda.is_available():
    # Triton reads the switch when it is imported, so it is set before any test imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> str:
    """An MLflow SQLite store with its schema made once: migrating a new database takes seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return str(path)


@pytest.fixture
def tracking_uri(tmp_path, _empty_store) -> str:
    """A fresh SQLite MLflow store under the test's temporary directory (a copy of the empty template)."""
    shutil.copy(_empty_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def tracker(tracking_uri, tmp_path):
    """A tracker on the test's own store, experiment `tiny`, artifacts under the test's folder."""
    from bench.tracking import Tracker

    return Tracker(tracking_uri, "tiny", str(tmp_path / "artifacts"))


@pytest.fixture
def synthetic_bundle():
    """tests.helpers.tiny_bundle(): 16 synthetic classes, class-disjoint train / val / test."""
    from tests.helpers import tiny_bundle

    return tiny_bundle()
