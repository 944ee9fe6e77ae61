"""Real servers for the tests that need one: a throwaway PostgreSQL and an `mlflow server`, each on a free
port of 127.0.0.1, in a temporary folder that is removed with it.

PostgreSQL comes from the system's server binaries (Debian's `postgresql` package: `initdb` and `pg_ctl` in
/usr/lib/postgresql/<version>/bin). `pg_ctl` refuses to run as root, so under root the cluster belongs to the
`postgres` user that the package creates. Without the binaries or the driver, `postgres_or_skip` skips with
the command that installs them. Both servers can be stopped and started again on the same port and data, so
tests can take them away mid-run. Starting and stopping wait for the server to answer (or to stop answering)
for minutes, so a busy machine makes a test slower, not red.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import WAIT_S, wait_until

INSTALL_POSTGRES = (
    "install the PostgreSQL server (Debian/Ubuntu: `sudo apt-get install postgresql`; it provides initdb and "
    'pg_ctl) and the driver (`.venv/bin/pip install -e ".[postgres]"`)'
)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """The folder holding `initdb` and `pg_ctl`: Debian's newest version first, else PATH."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True
    )
    which = shutil.which("pg_ctl")
    candidates += [Path(which).resolve().parent] if which else []
    return next((d for d in candidates if (d / "initdb").is_file() and (d / "pg_ctl").is_file()), None)


class PostgresServer:
    """A PostgreSQL cluster in a temporary folder, trusting local connections as user `postgres`."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir, self.port = bin_dir, free_port()
        self.os_user = "postgres" if os.geteuid() == 0 else None  # pg_ctl refuses root
        self.folder = Path(tempfile.mkdtemp(prefix="smoothap-pg-"))
        self.data = self.folder / "data"
        if self.os_user:
            account = pwd.getpwnam(self.os_user)
            os.chown(self.folder, account.pw_uid, account.pw_gid)
        self._as_owner(
            [bin_dir / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]
        )

    def _as_owner(self, command: list, timeout: float = WAIT_S) -> None:
        result = subprocess.run(
            [str(part) for part in command],
            user=self.os_user,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.folder,
        )
        if result.returncode:
            raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{result.stdout}{result.stderr}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = self.folder / "postgres.log"
        self._as_owner([self._pg_ctl, "-D", self.data, "-l", log, "-o", options, *self._patient, "start"])

    def stop(self) -> None:
        """A fast shutdown: open connections are cut, as when a database server goes away."""
        self._as_owner([self._pg_ctl, "-D", self.data, "-m", "fast", *self._patient, "stop"])

    @property
    def _pg_ctl(self) -> Path:
        return self.bin_dir / "pg_ctl"

    @property
    def _patient(self) -> list[str]:
        """pg_ctl waits until the server is up (or down), for WAIT_S rather than its own 60 s."""
        return ["-w", "-t", str(int(WAIT_S))]

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres") as conn:
            conn.autocommit = True
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._as_owner([self.bin_dir / "pg_ctl", "-D", self.data, "-m", "immediate", "stop"])
        shutil.rmtree(self.folder, ignore_errors=True)


def postgres_or_skip() -> PostgresServer:
    """A started PostgreSQL server, or a skip that says how to install one."""
    pytest.importorskip("psycopg", reason=f"psycopg is not installed: {INSTALL_POSTGRES}")
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(f"no PostgreSQL server binaries found: {INSTALL_POSTGRES}")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and pg_ctl refuses root: create a `postgres` user to run it as")
    server = PostgresServer(bin_dir)
    try:
        server.start()
    except Exception:
        server.remove()
        raise
    return server


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and a local artifact root in a temporary folder.

    Its output goes to `log`. The job executor is off: the tests need tracking only, and it slows the start.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="smoothap-mlflow-"))
        self.log = self.folder / "server.log"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = WAIT_S) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        command = [
            str(mlflow if mlflow.exists() else shutil.which("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_PASSWORD", None)  # the server never sees a test's secret
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not answer within {timeout:.0f} s:\n{self.log_text()}")
            time.sleep(0.25)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server and its request workers (its own process group)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
        # a request worker may linger a moment; a server still answering would spoil an outage test
        wait_until(lambda: not self.answers(), "the stopped mlflow server to stop answering", poll=0.25)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
