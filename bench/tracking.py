"""The only module that talks to MLflow: runs, their status, their params, metrics, tags and artifacts.

A run's final status is set in one place, `Tracker.run`: FINISHED when its block ends, KILLED when it is
interrupted or pruned by Optuna, FAILED otherwise. Searches go through `find_runs`, which writes MLflow's
filter syntax so callers never do. Credentials never reach MLflow: URLs are redacted before they are logged
or printed, and a team's server's password comes from the environment (MLFLOW_TRACKING_PASSWORD).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault(
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"
)  # one bar per checkpoint read clutters logs

from mlflow.entities import Metric, Param, Run, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from bench import layout  # noqa: E402

_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@:]*)(:(?P<password>[^/@]*))?@")


class MissingExperiment(LookupError):
    """The store has no experiment of that name (only raised when the tracker may not create one)."""


def redact(text: str) -> str:
    """Hide the password of any URL in `text` (`postgresql://u:secret@h/db` -> `postgresql://u:***@h/db`)."""
    return _USERINFO.sub(
        lambda m: f"{m['scheme']}{m['user']}{':***' if m['password'] is not None else ''}@", text
    )


def end_status(error: BaseException | None) -> str:
    """How a run's block ended, as an MLflow status: pruning (Optuna) and Ctrl-C are KILLED, errors FAILED."""
    if error is None:
        return "FINISHED"
    from optuna.exceptions import TrialPruned

    return "KILLED" if isinstance(error, TrialPruned | KeyboardInterrupt) else "FAILED"


class Tracker:
    """One MLflow experiment; methods take the run id so nested and parallel runs stay explicit.

    `create=False` opens an existing experiment only (reports read, they must not create stores).
    """

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        artifact_location: str = layout.MLFLOW_ARTIFACTS,
        *,
        create: bool = True,
    ) -> None:
        self.uri = layout.tracking_uri(uri)
        if create:
            layout.make_sqlite_folder(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None and not create:
            names = sorted(e.name for e in self.client.search_experiments())
            raise MissingExperiment(
                f"experiment {experiment!r} not found in the MLflow store {redact(self.uri)}; "
                f"it has: {', '.join(names) if names else 'no experiments'}"
            )
        if found is None:
            location = (
                artifact_location
                if "://" in artifact_location
                else Path(artifact_location).resolve().as_uri()
            )
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        self.experiment = experiment

    # ------------------------------------------------------------------ run lifecycle

    @contextmanager
    def run(
        self,
        name: str | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        *,
        run_id: str | None = None,
    ) -> Iterator[str]:
        """A new run (or `run_id` reopened) for the block; its status follows how the block ends.

        A failure's message is kept as the run's `failure` tag, so a FAILED run says why in the MLflow UI.
        """
        run_id = self.resume_run(run_id) if run_id else self.start_run(name, tags, parent_run_id)
        try:
            yield run_id
        except BaseException as error:
            status = end_status(error)
            if status == "FAILED":
                self.set_tags(run_id, {"failure": f"{type(error).__name__}: {error}"[:5000]})
            self.end_run(run_id, status)
            raise
        self.end_run(run_id, "FINISHED")

    def start_run(
        self, name: str | None = None, tags: dict[str, str] | None = None, parent_run_id: str | None = None
    ) -> str:
        """A RUNNING run; end it with `end_run` (a study's parent run spans several commands)."""
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        commit = git_commit()
        if commit:
            tags.setdefault("mlflow.source.git.commit", commit)
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def resume_run(self, run_id: str) -> str:
        """Reopen a run (after --resume) so its metrics continue in the same place."""
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    # ------------------------------------------------------------------ logging

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Params not yet on the run (MLflow refuses to change one), in batches of 100."""
        existing = self.client.get_run(run_id).data.params
        fresh = [Param(k, _param_text(v)) for k, v in params.items() if k not in existing]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(run_id, params=fresh[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    # ------------------------------------------------------------------ reading

    def has_run(self, run_id: str | None) -> bool:
        """Whether this store holds `run_id` (a study may have been tuned against another store)."""
        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
            return True
        except MlflowException:
            return False

    def get_run(self, run_id: str) -> Run:
        return self.client.get_run(run_id)

    def find_runs(
        self,
        tags: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        status: str | None = None,
        max_results: int | None = None,
    ) -> list[Run]:
        """Runs of this experiment whose tags, params and status equal the given values (all pages)."""
        conditions = [f"tags.`{k}` = {_quoted(v)}" for k, v in (tags or {}).items()]
        conditions += [f"params.`{k}` = {_quoted(v)}" for k, v in (params or {}).items()]
        if status:
            conditions.append(f"attributes.status = {_quoted(status)}")
        found: list[Run] = []
        token = None
        while max_results is None or len(found) < max_results:
            page = self.client.search_runs(
                [self.experiment_id], " and ".join(conditions), max_results=1000, page_token=token
            )
            found.extend(page)
            token = page.token
            if not token:
                break
        return found if max_results is None else found[:max_results]

    def find_run(
        self,
        tags: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        status: str | None = None,
    ) -> Run | None:
        """The first run that `find_runs` returns, or None."""
        runs = self.find_runs(tags, params, status, max_results=1)
        return runs[0] if runs else None

    def metric_history(self, run_id: str, key: str) -> list[Metric]:
        return self.client.get_metric_history(run_id, key)

    def download_artifact(self, run_id: str, path: str, dst: Path) -> Path | None:
        """The run's artifact `path` copied under `dst`, or None when the run logged none there."""
        folder = str(Path(path).parent) if Path(path).parent != Path(".") else None
        if path not in {a.path for a in self.client.list_artifacts(run_id, folder)}:
            return None
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(dst)))


def _quoted(value: Any) -> str:
    """A value as an MLflow filter string literal (double-quoted when it holds a single quote)."""
    text = str(value)
    if "'" in text and '"' in text:
        raise ValueError(f"cannot search MLflow for a value with both quote characters: {text!r}")
    return f'"{text}"' if "'" in text else f"'{text}'"


def _param_text(value: Any) -> str:
    """MLflow params are strings of at most 6000 characters; URLs lose their passwords."""
    return redact(str(value))[:6000]


def git_commit() -> str | None:
    """The commit of the source tree this code runs from, with `-dirty` when it has uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        if commit.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None
