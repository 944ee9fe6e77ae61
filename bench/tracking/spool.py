"""Writes a tracking server did not take, kept in order on local disk, and `sync`, which sends them later."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from bench import layout
from bench.tracking.server import redact, unreachable

SPOOL_DIR = Path(layout.RESULTS) / "spool"


def apply_record(client: MlflowClient, record: dict[str, Any]) -> None:
    """Carry out one write record (what `Tracker` sends at once, or what the spool kept) on `client`."""
    op, run_id = record["op"], record["run_id"]
    if op == "params":
        existing = client.get_run(run_id).data.params
        fresh = [Param(k, v) for k, v in record["params"].items() if k not in existing]
        for start in range(0, len(fresh), 100):
            client.log_batch(run_id, params=fresh[start : start + 100])
    elif op == "metrics":
        metrics = [Metric(k, v, record["time"], record["step"]) for k, v in record["metrics"].items()]
        client.log_batch(run_id, metrics=metrics)
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif op == "artifact":
        client.log_artifact(run_id, record["path"], record["artifact_path"])
    elif op == "status" and record["status"] == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    elif op == "status":
        client.set_terminated(run_id, status=record["status"], end_time=record["time"])
    else:
        raise ValueError(f"unknown tracking record {op!r} for run {run_id}")


class Spool:
    """Writes a server did not take, one JSON line each, in order, in one file per run and process:
    `<folder>/<run id>.<pid>.jsonl`, whose first line names the server (its URL redacted). An artifact is
    copied into `<folder>/files/`, since its file may be gone by the time the server is back."""

    def __init__(self, folder: Path, uri: str) -> None:
        self.folder, self.uri = folder, uri

    def path(self, run_id: str) -> Path:
        return self.folder / f"{run_id}.{os.getpid()}.jsonl"

    def holds(self, run_id: str) -> bool:
        return self.path(run_id).exists()

    def append(self, record: dict[str, Any]) -> None:
        path = self.path(record["run_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        if record["op"] == "artifact":
            kept = self.folder / "files" / uuid.uuid4().hex / Path(record["path"]).name
            kept.parent.mkdir(parents=True)
            shutil.copy2(record["path"], kept)
            record = {**record, "path": str(kept.resolve())}
        lines = [] if path.exists() else [json.dumps({"server": redact(self.uri)})]
        with path.open("a") as spool:
            spool.write("".join(line + "\n" for line in [*lines, json.dumps(record)]))
            spool.flush()
            os.fsync(spool.fileno())


def replay(client: MlflowClient, path: Path) -> int:
    """Send the records of a spool file in order and remove it; how many were sent. When the server stops
    answering on the way, the unsent rest is written back and the error raised."""
    header, *records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for done, record in enumerate(records):
        try:
            apply_record(client, record)
        except Exception:
            rest = path.with_suffix(".rest")
            rest.write_text("".join(json.dumps(r) + "\n" for r in [header, *records[done:]]))
            rest.replace(path)
            raise
        if record["op"] == "artifact":
            shutil.rmtree(Path(record["path"]).parent, ignore_errors=True)
    path.unlink()
    return len(records)


@dataclass
class SyncResult:
    runs: int = 0
    records: int = 0
    left: list[Path] = field(default_factory=list)  # files whose server still does not answer
    busy: list[Path] = field(default_factory=list)  # files a live process is still writing


def sync(spool_dir: str | Path = SPOOL_DIR, uri: str | None = None) -> SyncResult:
    """Send every spooled record under `spool_dir` to its server: `uri`, else the one each file names (a
    URL whose password was redacted must be given again). A file a live process still writes is left to
    it; a server that still does not answer keeps its files for the next sync."""
    result = SyncResult()
    clients: dict[str, MlflowClient] = {}
    down: set[str] = set()
    for path in sorted(Path(spool_dir).glob("*.jsonl"), key=lambda p: p.stat().st_mtime):
        if _writer_alive(path):
            result.busy.append(path)
            continue
        with path.open() as spool:
            target = uri or json.loads(spool.readline())["server"]
        if ":***@" in target:
            raise ValueError(f"{path} was kept for {target}: give that server's URL with --tracking-uri")
        if target in down:
            result.left.append(path)
            continue
        client = clients.setdefault(target, MlflowClient(tracking_uri=target))
        try:
            result.records += replay(client, path)
            result.runs += 1
        except Exception as error:
            if not unreachable(error):
                raise ValueError(f"{redact(target)} refused a record of {path}: {error}") from error
            down.add(target)
            result.left.append(path)
    return result


def _writer_alive(path: Path) -> bool:
    """Whether the process that writes a spool file (its name's pid) is alive and is not this one."""
    try:
        pid = int(path.name.split(".")[-2])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
