"""The only package that talks to MLflow: runs, their status, their params, metrics, tags and artifacts.

A run's final status is set in one place, `Tracker.run`: FINISHED when its block ends, KILLED when it is
interrupted or pruned by Optuna, FAILED otherwise. Searches go through `find_runs`, which writes MLflow's
filter syntax so callers never do. Credentials never reach MLflow: URLs are redacted before they are logged
or printed, and a team's server's password comes from the environment (MLFLOW_TRACKING_PASSWORD).

Outages of a tracking server: MLflow's own HTTP retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, set here to about
15 s unless the environment says otherwise) ride out a blip. A longer outage does not stop training: what a
run writes meanwhile is kept in a local spool (JSON lines under results/spool/, `Spool`) and sent, in order,
as soon as the server answers again; a run that ends before that says where its records are, and `sync`
sends them later. Reads and new runs wait for the server (`SERVER_WAIT_S`) instead. MLflow's asynchronous
logging is not used for this: a batch that fails there is logged and dropped, and it covers neither
artifacts nor a run's status.

The parts: `tracker` (Tracker: runs, logging, reading), `spool` (what a server did not take, and `sync`),
`server` (is a URI a server, does it answer, did an error mean no answer, URLs without passwords).
"""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault(
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"
)  # one bar per checkpoint read clutters logs
# MLflow's own retries for an unanswered request: 4 with backoff 0, 2, 4, 8 s (its default, 7 retries, stalls
# a run for about 4 minutes before the spool could take over)
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

from bench.tracking.server import is_server, redact, server_answers, unreachable  # noqa: E402
from bench.tracking.spool import SPOOL_DIR, Spool, SyncResult, apply_record, replay, sync  # noqa: E402
from bench.tracking.tracker import (  # noqa: E402
    MissingExperiment,
    ServerUnreachable,
    Tracker,
    end_status,
    git_commit,
)

__all__ = [
    "SPOOL_DIR",
    "MissingExperiment",
    "ServerUnreachable",
    "Spool",
    "SyncResult",
    "Tracker",
    "apply_record",
    "end_status",
    "git_commit",
    "is_server",
    "redact",
    "replay",
    "server_answers",
    "sync",
    "unreachable",
]
