"""A thin MLflow wrapper, passed explicitly into training so tests can use a throwaway SQLite store.

Credentials never reach MLflow: URLs are redacted before they are logged or printed, and a team's server's
password comes from the environment (MLFLOW_TRACKING_URI / MLFLOW_TRACKING_PASSWORD), not from config files.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

DEFAULT_URI = "sqlite:///results/mlflow.db"
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@:]*)(:(?P<password>[^/@]*))?@")


def redact(text: str) -> str:
    """Hide the password of any URL in `text` (`postgresql://u:secret@h/db` -> `postgresql://u:***@h/db`)."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}{':***' if m['password'] is not None else ''}@", text)


def resolve_uri(uri: str | None) -> str:
    """Explicit argument, else MLFLOW_TRACKING_URI, else the project's SQLite store; makes its folder."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    return uri


class Tracker:
    """One MLflow experiment; methods take the run id so nested and parallel runs stay explicit."""

    def __init__(self, uri: str | None, experiment: str, artifact_location: str = "results/mlartifacts") -> None:
        self.uri = resolve_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = Path(artifact_location).resolve().as_uri() if "://" not in artifact_location else artifact_location
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        self.experiment = experiment

    def start_run(self, run_name: str | None = None, tags: dict[str, str] | None = None,
                  parent_run_id: str | None = None) -> str:
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        commit = git_commit()
        if commit:
            tags.setdefault("mlflow.source.git.commit", commit)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        return run.info.run_id

    def has_run(self, run_id: str | None) -> bool:
        """Whether this store holds `run_id` (a study may have been tuned against another store)."""
        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def resume_run(self, run_id: str) -> str:
        """Reopen a run (after --resume) so its metrics continue in the same place."""
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        existing = self.client.get_run(run_id).data.params
        fresh = [Param(k, _param_text(v)) for k, v in params.items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(run_id, params=fresh[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


def _param_text(value: Any) -> str:
    """MLflow params are strings of at most 6000 characters; URLs lose their passwords."""
    return redact(str(value))[:6000]


def git_commit() -> str | None:
    """The commit of the source tree this code runs from, with `-dirty` when it has uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if commit.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None
