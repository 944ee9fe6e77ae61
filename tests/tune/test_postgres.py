"""Workers on a real PostgreSQL study (tests/servers.py starts one for this module): `--workers` processes
share one budget exactly, a worker SIGKILLed mid-trial or right after creating its trial leaves no RUNNING
trial, and a worker that loses the database waits for it, then gives up with a clear message.

The worker processes run this file as a script (`python -m tests.tune.test_postgres MODE ...`, at the bottom):
tiny synthetic data, and heartbeats of 1 s with a grace period of 3 s so that a dead worker shows in seconds.
"""

from __future__ import annotations

import datetime
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.helpers import tiny_bundle, tiny_experiment
from tests.servers import postgres_or_skip

REPO = Path(__file__).resolve().parents[2]
HEARTBEAT, GRACE = 1, 3
LOSS = "contrastive"


@pytest.fixture(scope="module")
def postgres():
    server = postgres_or_skip()
    yield server
    server.remove()


@pytest.fixture
def database(postgres) -> str:
    """A fresh database of the module's server, for one test's study."""
    return postgres.create_database(f"optuna_{uuid.uuid4().hex[:10]}")


def _experiment(workdir: Path, trials: int, epochs: int):
    """The tiny experiment with loss LOSS and no pruning (every trial that runs to its end is COMPLETE)."""
    from bench.tune.space import for_loss

    return for_loss(tiny_experiment(workdir, trials=trials, epochs=epochs, extra=["tune.pruner=none"]), LOSS)


@functools.cache
def _storage(url: str) -> optuna.storages.RDBStorage:
    """One plain storage per database for the test's own reads (a new one per poll would pile up
    connections)."""
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def _trials(url: str, workdir: Path) -> list[optuna.trial.FrozenTrial]:
    name = f"{_experiment(workdir, 1, 1).name}-{LOSS}"
    return optuna.load_study(study_name=name, storage=_storage(url)).get_trials(deepcopy=False)


def _by_state(trials, state: TrialState) -> list:
    return [t for t in trials if t.state == state and not t.user_attrs.get("surplus")]


def _driver(mode: str, url: str, workdir: Path, *numbers: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "tests.tune.test_postgres", mode, url, str(workdir), *map(str, numbers)]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(condition, process: subprocess.Popen, limit: float = 240.0):
    """Poll `condition()` until it returns something truthy; fail if the process ends first."""
    deadline = time.monotonic() + limit
    while True:
        try:
            found = condition()
        except (KeyError, optuna.exceptions.StorageInternalError):  # no study yet
            found = None
        if found:
            return found
        if process.poll() is not None:
            raise AssertionError(f"the workers exited early:\n{process.stdout.read()}")
        assert time.monotonic() < deadline, "the workers made no progress"
        time.sleep(0.2)


def _spawned_children(pid: int) -> set[int]:
    """The worker processes `pid` spawned, read from /proc (independent of what the workers record); its
    multiprocessing resource tracker is a child too, but not a worker."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if parent == pid and b"spawn_main" in command:
            children.add(int(stat.parent.name))
    return children


def test_worker_slots_pin_one_gpu_each_or_split_the_cores():
    from bench.tune.workers import worker_slots

    on_gpus = worker_slots(5, gpus=["2", "3"], cpus=16)
    assert [s.gpu for s in on_gpus] == ["2", "3", "2", "3", "2"] and {s.threads for s in on_gpus} == {3}
    on_cpu = worker_slots(3, device="cpu", cpus=8)
    assert [(s.gpu, s.threads) for s in on_cpu] == [(None, 2)] * 3
    assert [s.threads for s in worker_slots(4, device="cpu", cpus=2)] == [1] * 4


def test_three_workers_finish_the_budget_exactly_though_one_is_killed_mid_trial(database, tmp_path):
    budget = 12
    driver = _driver("workers", database, tmp_path, budget, 3, 3)

    def running_after_a_complete():
        trials = _trials(database, tmp_path)
        running = [t for t in _by_state(trials, TrialState.RUNNING) if "worker" in t.user_attrs]
        return running[0] if running and _by_state(trials, TrialState.COMPLETE) else None

    victim = _wait_for(running_after_a_complete, driver)
    workers = _spawned_children(driver.pid)
    victim_pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
    assert len(workers) == 3 and victim_pid in workers
    os.kill(victim_pid, signal.SIGKILL)
    killed_at = datetime.datetime.now()
    before = {
        t.number: (t.params, t.value) for t in _by_state(_trials(database, tmp_path), TrialState.COMPLETE)
    }
    output, _ = driver.communicate(timeout=400)
    assert driver.returncode == 0, output
    assert f"pid {victim_pid}, CPU, 1 thread) was killed by signal 9" in output

    trials = _trials(database, tmp_path)
    complete = _by_state(trials, TrialState.COMPLETE)
    assert len(complete) == budget and not _by_state(trials, TrialState.RUNNING)
    assert {t.number: (t.params, t.value) for t in complete if t.number in before} == before
    host = socket.gethostname()
    victim_tag = f"{host}:{victim_pid}"
    (failed,) = _by_state(trials, TrialState.FAIL)  # the trial the victim ran when it died (maybe a next one)
    assert failed.user_attrs.get("worker", victim_tag) == victim_tag and failed.number >= victim.number
    # failed by the heartbeat check: no sooner than a grace period after its worker died
    assert failed.datetime_complete >= killed_at + datetime.timedelta(seconds=GRACE - 1)
    assert {t.user_attrs["worker"] for t in complete} <= {f"{host}:{pid}" for pid in workers}
    assert {t.user_attrs["worker_gpu"] for t in complete} == {"none"}
    replacements = [t for t in complete if t.number > failed.number]
    assert replacements and all(t.user_attrs["worker"] != victim_tag for t in replacements)


def test_a_worker_killed_right_after_creating_its_trial_leaves_no_running_trial(database, tmp_path):
    from bench.tune import LossStudy, TuneJob, open_storage, tune_losses
    from bench.tune.study import SILENT_FAILURE

    exp = _experiment(tmp_path, trials=3, epochs=1)
    LossStudy(exp, open_storage(database, HEARTBEAT, GRACE))  # the study exists, as `--workers` makes it
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys, optuna\n"
            "optuna.load_study(study_name=sys.argv[1], storage=sys.argv[2]).ask()\n"
            "os.kill(os.getpid(), signal.SIGKILL)  # before any heartbeat",
            f"{exp.name}-{LOSS}",
            database,
        ],
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL
    (orphan,) = _trials(database, tmp_path)
    assert orphan.state == TrialState.RUNNING

    job = TuneJob(
        exp,
        [LOSS],
        storage=database,
        device="cpu",
        heartbeat_interval=HEARTBEAT,
        grace_period=GRACE,
        poll_s=0.2,
        timeout=60,  # without the fix the orphan holds a slot forever: this ends the wait
    )
    tune_losses(job, bundle=tiny_bundle(), log=None)
    trials = _trials(database, tmp_path)
    assert len(_by_state(trials, TrialState.COMPLETE)) == 3 and not _by_state(trials, TrialState.RUNNING)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [orphan.number]
    assert failed[0].user_attrs["failed"] == SILENT_FAILURE


def test_a_worker_waits_out_a_database_restart_and_gives_up_on_a_lost_one(postgres, database, tmp_path):
    from bench.tune import LossStudy, open_storage
    from bench.tune.workers import EXIT_STORAGE_LOST

    driver = _driver("lose", database, tmp_path, 3, 40)

    def running(number: int):
        return [t for t in _by_state(_trials(database, tmp_path), TrialState.RUNNING) if t.number == number]

    _wait_for(lambda: running(0), driver)
    postgres.stop()  # a restart in the middle of trial 0: its calls wait, then carry on
    time.sleep(2)
    postgres.start()
    _wait_for(lambda: running(1), driver)
    postgres.stop()  # gone for good (longer than the worker's 6 s retry period)
    try:
        output, _ = driver.communicate(timeout=120)
    finally:
        postgres.start()
    assert driver.returncode == EXIT_STORAGE_LOST, output
    assert "lost the Optuna storage postgresql+psycopg://postgres@127.0.0.1" in output
    assert "no answer for 6 s" in output and "Traceback" not in output

    trials = {t.number: t for t in _trials(database, tmp_path)}
    assert trials[0].state == TrialState.COMPLETE and trials[1].state == TrialState.RUNNING
    study = LossStudy(_experiment(tmp_path, 3, 40), open_storage(database, HEARTBEAT, GRACE))
    time.sleep(GRACE + 1)
    study.status()  # the next worker's look at the study fails the dead worker's trial by heartbeat
    assert _trials(database, tmp_path)[1].state == TrialState.FAIL


def _main(argv: list[str]) -> None:
    """`workers URL WORKDIR TRIALS EPOCHS N`: N worker processes (`tune_in_workers`).
    `lose URL WORKDIR TRIALS EPOCHS`: one worker in this process, giving up on the database after 6 s."""
    import torch

    from bench.tune import TuneJob
    from bench.tune import study as study_module
    from bench.tune.workers import WorkerJob, WorkerSlot, run_worker, tune_in_workers

    torch.set_num_threads(1)
    mode, url, workdir, trials, epochs, *rest = argv
    exp = _experiment(Path(workdir), int(trials), int(epochs))
    settings = {"heartbeat_interval": HEARTBEAT, "grace_period": GRACE, "poll_s": 0.5}
    if mode == "workers":
        # timeout in seconds: a slow machine ends with fewer trials, and the test says so
        job = TuneJob(exp, [LOSS], url, "cpu", timeout=300, workers=int(rest[0]), **settings)
        tune_in_workers(job, bundle=tiny_bundle())
    else:
        study_module.STORAGE_RETRY_S = 6.0
        job = WorkerJob(TuneJob(exp, [LOSS], url, "cpu", timeout=200, **settings), None, tiny_bundle())
        run_worker(job, WorkerSlot(0, None, 1))


if __name__ == "__main__":
    _main(sys.argv[1:])
