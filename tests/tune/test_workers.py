"""Robustness to killed and parallel workers: separate processes on one SQLite study
(tests/tune/worker.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tests.tune.worker import tune_worker

REPO = Path(__file__).resolve().parents[2]


def _counts(storage: str, name: str) -> dict[TrialState, list]:
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    return {state: [t for t in trials if t.state == state] for state in TrialState}


def _worker(storage: str, workdir: Path, trials: int, epochs: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [
        sys.executable,
        "-m",
        "tests.tune.worker",
        storage,
        str(workdir),
        str(trials),
        str(epochs),
    ]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(condition, process: subprocess.Popen, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"worker exited early:\n{process.stdout.read()}")
        assert time.monotonic() < deadline, "worker made no progress"
        time.sleep(0.1)


def test_a_worker_killed_mid_trial_loses_nothing_and_the_rerun_completes_the_budget(tmp_path):
    storage, name = f"sqlite:///{tmp_path / 'optuna.db'}", "omniglot-contrastive"
    worker = _worker(storage, tmp_path, 3, 4)

    def one_done_one_running() -> bool:
        try:
            counts = _counts(storage, name)
        except Exception:  # the worker has not created the database or the study yet
            return False
        return len(counts[TrialState.COMPLETE]) >= 1 and len(counts[TrialState.RUNNING]) == 1

    _wait_for(one_done_one_running, worker)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    before = _counts(storage, name)
    assert len(before[TrialState.RUNNING]) == 1, "the kill landed between two trials"
    killed = before[TrialState.RUNNING][0].number
    completed = {t.number: (t.params, t.value) for t in before[TrialState.COMPLETE]}

    tune_worker(storage, tmp_path, 3, 4)  # the same command again (in this process: no second start-up)
    after = _counts(storage, name)
    assert {
        t.number: (t.params, t.value) for t in after[TrialState.COMPLETE] if t.number in completed
    } == completed
    assert len(after[TrialState.COMPLETE]) == 3 and not after[TrialState.RUNNING]
    assert [t.number for t in after[TrialState.FAIL]] == [killed]


def test_two_workers_share_one_study_and_finish_the_budget_together(tmp_path):
    storage, name, budget = f"sqlite:///{tmp_path / 'optuna.db'}", "omniglot-contrastive", 4
    other = _worker(storage, tmp_path, budget, 2)

    def other_has_started_a_trial() -> bool:
        try:
            return len(_counts(storage, name)[TrialState.RUNNING]) == 1
        except Exception:  # the worker has not created the database or the study yet
            return False

    _wait_for(other_has_started_a_trial, other)
    tune_worker(storage, tmp_path, budget, 2)  # this test's process joins as the second worker
    output, _ = other.communicate(timeout=180)
    assert other.returncode == 0, output
    counts = _counts(storage, name)
    complete = counts[TrialState.COMPLETE]
    assert len(complete) == budget and not counts[TrialState.RUNNING]
    assert all(
        t.user_attrs.get("surplus") for t in counts[TrialState.FAIL]
    )  # only lost races, never training
    assert len({tuple(sorted(t.params.items())) for t in complete}) == budget  # no configuration ran twice
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both workers did part of the work
