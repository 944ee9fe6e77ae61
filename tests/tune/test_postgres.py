"""Workers on a real PostgreSQL study (tests/servers.py starts one for this module): `--workers` processes
share one budget exactly, a worker SIGKILLed mid-trial or right after creating its trial leaves no RUNNING
trial, and a worker that loses the database waits for it, then gives up with a clear message.

The worker processes run this file as a script (`python -m tests.tune.test_postgres MODE ...`, at the bottom):
tiny synthetic data and heartbeats of 1 s. Tests wait for events (a trial state, a stalled trial's marker, a
process exit) with bounds of minutes, never for a fixed time, so a busy machine only makes them slower.
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

from tests.helpers import WAIT_S, reaped_module, tiny_bundle, tiny_experiment, wait_until
from tests.servers import postgres_or_skip
from tests.tune.stall import stall_trials_from, stalled

HEARTBEAT = 1
# One live worker at a time: no one sees another's live trial, so a short grace shows a dead one in seconds.
GRACE = 3
# Live workers side by side: one whose heartbeat is late on a busy machine must not lose its trial to another.
SHARED_GRACE = 60
RETRY_S = 60  # the `lose` worker's patience: longer than any restart of the server takes on a busy machine
STALL_ENV = "SMOOTHAP_TEST_STALL"  # `<trial number>:<marker file>`, read by the spawned workers (bottom)
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


def _trials_once_made(url: str, workdir: Path) -> list[optuna.trial.FrozenTrial]:
    """The study's trials; none while the worker has not made the study yet."""
    try:
        return _trials(url, workdir)
    except (KeyError, optuna.exceptions.StorageInternalError):
        return []


def _by_state(trials, state: TrialState) -> list:
    return [t for t in trials if t.state == state and not t.user_attrs.get("surplus")]


def _driver(mode: str, url: str, workdir: Path, *numbers: int):
    """`python -m tests.tune.test_postgres MODE ...` in its own session: killed with its workers at the
    end."""
    return reaped_module("tests.tune.test_postgres", mode, url, workdir, *numbers)


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
    budget, stall_at = 12, 3  # trial 3 starts once a worker has finished its first: one is COMPLETE by then
    with _driver("workers", database, tmp_path, budget, 3, 3, stall_at) as driver:
        victim_pid, stalled_trial = wait_until(
            lambda: stalled(tmp_path / "stalled"), "a worker to stall mid-trial", process=driver
        )
        workers = _spawned_children(driver.pid)
        assert len(workers) == 3 and victim_pid in workers
        os.kill(victim_pid, signal.SIGKILL)
        killed_at = datetime.datetime.now()
        trials = _trials(database, tmp_path)
        (victim,) = [t for t in trials if t.number == stalled_trial]
        assert victim.state == TrialState.RUNNING and victim.intermediate_values  # killed mid-training
        before = {t.number: (t.params, t.value) for t in _by_state(trials, TrialState.COMPLETE)}
        assert before
        output, _ = driver.communicate(timeout=2 * WAIT_S)
    assert driver.returncode == 0, output
    assert f"pid {victim_pid}, CPU, 1 thread) was killed by signal 9" in output

    trials = _trials(database, tmp_path)
    complete = _by_state(trials, TrialState.COMPLETE)
    assert len(complete) == budget and not _by_state(trials, TrialState.RUNNING)
    assert {t.number: (t.params, t.value) for t in complete if t.number in before} == before
    host = socket.gethostname()
    victim_tag = f"{host}:{victim_pid}"
    (failed,) = _by_state(trials, TrialState.FAIL)
    assert failed.number == stalled_trial and failed.user_attrs["worker"] == victim_tag
    # failed by the heartbeat check: no sooner than a grace period after its worker died
    assert failed.datetime_complete >= killed_at + datetime.timedelta(seconds=SHARED_GRACE - 1)
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
        timeout=WAIT_S,  # without the fix the orphan holds a slot forever: this ends the wait
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

    def running(number: int):
        trials = _by_state(_trials_once_made(database, tmp_path), TrialState.RUNNING)
        return [t for t in trials if t.number == number]

    with _driver("lose", database, tmp_path, 3, 40) as driver:
        wait_until(lambda: running(0), "trial 0 to start", process=driver)
        postgres.stop()  # a restart in the middle of trial 0: its calls wait, then carry on
        time.sleep(2)  # the outage (the heartbeats, every second, run into it): not a wait for anything
        postgres.start()
        wait_until(lambda: running(1), "trial 1 to start", process=driver)
        postgres.stop()  # gone for good (longer than the worker's retry period)
        try:
            output, _ = driver.communicate(timeout=WAIT_S)
        finally:
            postgres.start()
    assert driver.returncode == EXIT_STORAGE_LOST, output
    assert "lost the Optuna storage postgresql+psycopg://postgres@127.0.0.1" in output
    assert f"no answer for {RETRY_S} s" in output and "Traceback" not in output

    trials = {t.number: t for t in _trials(database, tmp_path)}
    assert trials[0].state == TrialState.COMPLETE and trials[1].state == TrialState.RUNNING
    study = LossStudy(_experiment(tmp_path, 3, 40), open_storage(database, HEARTBEAT, GRACE))

    def failed_by_heartbeat() -> bool:
        study.status()  # the next worker's look at the study fails the dead worker's trial once it is stale
        return _trials(database, tmp_path)[1].state == TrialState.FAIL

    wait_until(failed_by_heartbeat, "the dead worker's trial to fail by heartbeat", poll=1.0)


def _main(argv: list[str]) -> None:
    """`workers URL WORKDIR TRIALS EPOCHS N STALL_AT`: N worker processes (`tune_in_workers`), the first to
    reach trial STALL_AT or a later one hanging in it (tests/tune/stall.py, through STALL_ENV).
    `lose URL WORKDIR TRIALS EPOCHS`: one worker in this process, giving up on the database after RETRY_S."""
    import torch

    from bench.tune import TuneJob
    from bench.tune import study as study_module
    from bench.tune.workers import WorkerJob, WorkerSlot, run_worker, tune_in_workers

    torch.set_num_threads(1)
    mode, url, workdir, trials, epochs, *rest = argv
    exp = _experiment(Path(workdir), int(trials), int(epochs))
    if mode == "workers":
        os.environ[STALL_ENV] = f"{rest[1]}:{Path(workdir) / 'stalled'}"  # the workers inherit it
        settings = {"heartbeat_interval": HEARTBEAT, "grace_period": SHARED_GRACE, "poll_s": 0.5}
        job = TuneJob(exp, [LOSS], url, "cpu", workers=int(rest[0]), **settings)
        tune_in_workers(job, bundle=tiny_bundle())
    else:
        study_module.STORAGE_RETRY_S = RETRY_S
        settings = {"heartbeat_interval": HEARTBEAT, "grace_period": GRACE, "poll_s": 0.5}
        job = WorkerJob(TuneJob(exp, [LOSS], url, "cpu", **settings), None, tiny_bundle())
        run_worker(job, WorkerSlot(0, None, 1))


if __name__ == "__main__":
    _main(sys.argv[1:])
elif __name__ == "__mp_main__" and STALL_ENV in os.environ:
    # a worker that `workers` mode spawned: multiprocessing runs the parent's main module (this file) in each
    # spawned process under this name, before the worker starts
    number, marker = os.environ[STALL_ENV].split(":", 1)
    stall_trials_from(int(number), Path(marker))
