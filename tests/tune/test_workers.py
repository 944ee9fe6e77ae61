"""Robustness to killed and parallel workers: separate processes on one SQLite study
(tests/tune/worker.py). Each test waits for events (a trial state in the store, the marker of a stalled
trial, a process exit), never for a fixed time, so a busy machine only makes it slower."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tests.helpers import WAIT_S, reaped_module, wait_until
from tests.tune.stall import stalled
from tests.tune.worker import ALONE_GRACE_S, SHARED_GRACE_S, stall_marker, tune_worker


def _counts(storage: str, name: str) -> dict[TrialState, list]:
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    return {state: [t for t in trials if t.state == state] for state in TrialState}


def _worker(storage: str, workdir: Path, trials: int, epochs: int, grace: int, *stall_at: int):
    return reaped_module("tests.tune.worker", storage, workdir, trials, epochs, grace, *stall_at)


def test_a_worker_killed_mid_trial_loses_nothing_and_the_rerun_completes_the_budget(tmp_path):
    storage, name = f"sqlite:///{tmp_path / 'optuna.db'}", "omniglot-contrastive"
    with _worker(storage, tmp_path, 3, 4, ALONE_GRACE_S, 1) as worker:  # trial 1 hangs after an epoch
        pid, killed = wait_until(
            lambda: stalled(stall_marker(tmp_path)), "trial 1 to stall mid-trial", process=worker
        )
        assert (pid, killed) == (worker.pid, 1)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    before = _counts(storage, name)
    assert [t.number for t in before[TrialState.RUNNING]] == [killed]
    assert before[TrialState.RUNNING][0].intermediate_values  # it died mid-training, not before
    completed = {t.number: (t.params, t.value) for t in before[TrialState.COMPLETE]}
    assert list(completed) == [0]

    tune_worker(storage, tmp_path, 3, 4, ALONE_GRACE_S)  # the same command again (in this process)
    after = _counts(storage, name)
    assert {
        t.number: (t.params, t.value) for t in after[TrialState.COMPLETE] if t.number in completed
    } == completed
    assert len(after[TrialState.COMPLETE]) == 3 and not after[TrialState.RUNNING]
    assert [t.number for t in after[TrialState.FAIL]] == [killed]


def test_two_workers_share_one_study_and_finish_the_budget_together(tmp_path):
    storage, name, budget = f"sqlite:///{tmp_path / 'optuna.db'}", "omniglot-contrastive", 4

    def other_has_started_a_trial() -> bool:
        try:
            return len(_counts(storage, name)[TrialState.RUNNING]) == 1
        except Exception:  # the worker has not created the database or the study yet
            return False

    with _worker(storage, tmp_path, budget, 2, SHARED_GRACE_S) as other:
        wait_until(other_has_started_a_trial, "the other worker's first trial", process=other)
        tune_worker(storage, tmp_path, budget, 2, SHARED_GRACE_S)  # this test's process is the second
        output, _ = other.communicate(timeout=WAIT_S)
    assert other.returncode == 0, output
    counts = _counts(storage, name)
    complete = counts[TrialState.COMPLETE]
    assert len(complete) == budget and not counts[TrialState.RUNNING]
    assert all(
        t.user_attrs.get("surplus") for t in counts[TrialState.FAIL]
    )  # only lost races, never training
    assert len({tuple(sorted(t.params.items())) for t in complete}) == budget  # no configuration ran twice
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both workers did part of the work
