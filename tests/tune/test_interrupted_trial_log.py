"""Ctrl-C in a trial: the trial is FAIL in the study, and Optuna's two failure records for it (the traceback
and "failed with value None") are dropped, so the command's own line is the only one; other failures log."""

from __future__ import annotations

import logging

import optuna
import pytest

from bench.tune.runner import quiet_interrupted_trials


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_an_interrupted_trial_fails_quietly_and_other_failures_still_log():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_interrupted_trials()
    quiet_interrupted_trials()  # once only, however often tuning starts
    records = Records()
    logging.getLogger("optuna").addHandler(records)
    try:
        study = optuna.create_study()

        def interrupted(trial):
            trial.suggest_float("x", 0, 1)
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            study.optimize(interrupted, n_trials=1)

        def broken(trial):
            raise ValueError("boom")

        study.optimize(broken, n_trials=1, catch=(ValueError,))
    finally:
        logging.getLogger("optuna").removeHandler(records)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert not any(m.startswith("Trial 0 ") for m in records.messages)
    assert any(m.startswith("Trial 1 failed with parameters") and "boom" in m for m in records.messages)
    assert "Trial 1 failed with value None." in records.messages
