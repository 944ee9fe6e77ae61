"""Shared fixtures: a throwaway MLflow store per test, telemetry off, few threads on the shared CPU."""

from __future__ import annotations

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A fresh SQLite MLflow store under the test's temporary directory."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
