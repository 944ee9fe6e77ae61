"""`Tracker`: one MLflow experiment's runs, their status, params, metrics, tags and artifacts."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bench import layout
from bench.backoff import with_backoff
from bench.tracking.server import is_server, redact, server_answers, unreachable
from bench.tracking.spool import SPOOL_DIR, Spool, apply_record, replay

PROBE_S = 10.0  # while a run's records are spooled, how often a write checks whether the server is back
SERVER_WAIT_S = 300.0  # how long a read or a new run waits for an unreachable server
T = TypeVar("T")


class MissingExperiment(LookupError):
    """The store has no experiment of that name (only raised when the tracker may not create one)."""


class ServerUnreachable(ConnectionError):
    """The tracking server did not answer a request that cannot wait in the spool (a read, a new run)."""


def end_status(error: BaseException | None) -> str:
    """How a run's block ended, as an MLflow status: pruning (Optuna) and Ctrl-C are KILLED, errors FAILED."""
    if error is None:
        return "FINISHED"
    from optuna.exceptions import TrialPruned

    return "KILLED" if isinstance(error, TrialPruned | KeyboardInterrupt) else "FAILED"


class Tracker:
    """One MLflow experiment; methods take the run id so nested and parallel runs stay explicit.

    `create=False` opens an existing experiment only (reports read, they must not create stores). Writes to a
    run go through `_write`, which keeps them in the spool under `spool_dir` while the server is unreachable.
    """

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        artifact_location: str = layout.MLFLOW_ARTIFACTS,
        *,
        create: bool = True,
        spool_dir: str | Path = SPOOL_DIR,
    ) -> None:
        self.uri = layout.tracking_uri(uri)
        self.spool = Spool(Path(spool_dir), self.uri)
        self.wait_s = SERVER_WAIT_S
        self._last_probe = float("-inf")
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
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=_artifact_location(self.uri, artifact_location)
            )
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
        created = self._patiently(
            "start a run", lambda: self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        )
        return created.info.run_id

    def resume_run(self, run_id: str) -> str:
        """Reopen a run (after --resume) so its metrics continue in the same place."""
        self._write({"op": "status", "run_id": run_id, "status": "RUNNING"})
        return run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._write({"op": "status", "run_id": run_id, "status": status, "time": _now_ms()})
        if self.spool.holds(run_id):
            print(
                f"[tracking] run {run_id} ended {status} while the MLflow server {redact(self.uri)} was "
                f"unreachable; its records are kept in {self.spool.path(run_id)}: "
                f"`smoothap-bench sync --spool {self.spool.folder}` sends them",
                file=sys.stderr,
            )

    # ------------------------------------------------------------------ logging

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Params not yet on the run (MLflow refuses to change one), in batches of 100."""
        texts = {k: _param_text(v) for k, v in params.items()}
        self._write({"op": "params", "run_id": run_id, "params": texts})

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        if metrics:
            values = {k: float(v) for k, v in metrics.items()}
            self._write(
                {"op": "metrics", "run_id": run_id, "metrics": values, "step": step, "time": _now_ms()}
            )

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self._write({"op": "tags", "run_id": run_id, "tags": {k: redact(str(v)) for k, v in tags.items()}})

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self._write({"op": "artifact", "run_id": run_id, "path": str(path), "artifact_path": artifact_path})

    def _write(self, record: dict[str, Any]) -> None:
        """Send one write to the server, or keep it in the spool: while the run already has spooled records
        (until the server is back and they are sent first, so the order holds) or when the server does not
        answer. A run's end checks the server at once; other writes at most every PROBE_S seconds."""
        run_id = record["run_id"]
        if self.spool.holds(run_id) and not self._send_spooled(run_id, force=record["op"] == "status"):
            self.spool.append(record)
            return
        try:
            apply_record(self.client, record)
        except Exception as error:  # MLflow wraps most transport errors, not all
            if not unreachable(error):
                raise
            self.spool.append(record)
            print(
                f"[tracking] MLflow server {redact(self.uri)} unreachable; training goes on, and what run "
                f"{run_id} logs is kept in {self.spool.path(run_id)} until the server answers",
                file=sys.stderr,
            )

    def _send_spooled(self, run_id: str, force: bool = False) -> bool:
        """Whether the server took every spooled record of `run_id` (now, or it is not time to check)."""
        now = time.monotonic()
        if not force and now - self._last_probe < PROBE_S:
            return False
        self._last_probe = now
        if not server_answers(self.uri):
            return False
        try:
            sent = replay(self.client, self.spool.path(run_id))
        except Exception as error:
            if not unreachable(error):
                raise
            return False
        print(f"[tracking] MLflow server is back: sent the {sent} records run {run_id} kept", file=sys.stderr)
        return True

    def _patiently(self, what: str, call: Callable[[], T]) -> T:
        """`call` (a read or a new run), retried with backoff while the server does not answer, for up to
        `wait_s` seconds; then ServerUnreachable."""
        return with_backoff(
            call,
            transient=unreachable,
            seconds=self.wait_s,
            first_delay=1.0,
            max_delay=30.0,
            give_up=lambda _: ServerUnreachable(
                f"MLflow server {redact(self.uri)} did not answer for {self.wait_s:.0f} s "
                f"(to {what}): start it again, or give another --tracking-uri"
            ),
        )

    # ------------------------------------------------------------------ reading

    def has_run(self, run_id: str | None) -> bool:
        """Whether this store holds `run_id` (a study may have been tuned against another store)."""
        if not run_id:
            return False
        try:
            self.get_run(run_id)
            return True
        except MlflowException:
            return False

    def get_run(self, run_id: str) -> Run:
        return self._patiently("read a run", lambda: self.client.get_run(run_id))

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
            page = self._patiently(
                "search runs",
                lambda token=token: self.client.search_runs(
                    [self.experiment_id], " and ".join(conditions), max_results=1000, page_token=token
                ),
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
        return self._patiently("read metrics", lambda: self.client.get_metric_history(run_id, key))

    def download_artifact(self, run_id: str, path: str, dst: Path) -> Path | None:
        """The run's artifact `path` copied under `dst`, or None when the run logged none there."""
        folder = str(Path(path).parent) if Path(path).parent != Path(".") else None
        listed = self._patiently("list artifacts", lambda: self.client.list_artifacts(run_id, folder))
        if path not in {a.path for a in listed}:
            return None
        dst.mkdir(parents=True, exist_ok=True)
        return Path(
            self._patiently("download", lambda: self.client.download_artifacts(run_id, path, str(dst)))
        )


def _artifact_location(uri: str, location: str) -> str | None:
    """Where a new experiment keeps its artifacts: a URL as given, a folder as a file URL; None (the
    server's own artifact store) when the store is a server and the location is our local default, which
    only this machine could read."""
    if is_server(uri) and location == layout.MLFLOW_ARTIFACTS:
        return None
    return location if "://" in location else Path(location).resolve().as_uri()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _quoted(value: Any) -> str:
    """A value as an MLflow filter string literal (double-quoted when it holds a single quote)."""
    text = str(value)
    if "'" in text and '"' in text:
        raise ValueError(f"cannot search MLflow for a value with both quote characters: {text!r}")
    return f'"{text}"' if "'" in text else f"'{text}'"


def _param_text(value: Any) -> str:
    """MLflow params are strings of at most 6000 characters; URLs lose their passwords."""
    return redact(str(value))[:6000]


def git_commit(repo: Path | None = None) -> str | None:
    """The commit of `repo` (default: the source tree this code runs from), with `-dirty` when it has
    uncommitted changes; None outside git."""
    repo = repo or Path(__file__).resolve().parents[2]
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
