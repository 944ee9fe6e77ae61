"""The real main job killed mid-trial with SIGKILL and run again: the rerun finishes with the report written,
every loss's study holds its whole budget, and no trial completed before the kill is lost or redone.

It runs `python -m bench run --quick` on a small image folder (dataset `folder`, the on-disk layout a user's
own images take), so the job takes a minute rather than the bundled Omniglot's several.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna

from tests.helpers import WAIT_S, wait_until, write_folder_dataset

REPO = Path(__file__).resolve().parent.parent
LOSSES = ("smooth_ap", "triplet")


RUNNING_TRIAL_RUNS = (
    "SELECT runs.status FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
    "WHERE tags.key = 'stage' AND tags.value = 'trial' AND runs.status = 'RUNNING'"
)


def query(db: Path, sql: str) -> list[str]:
    """First column of `sql` on a SQLite file, read-only (none before the file or table exists)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
            return [value for (value, *_) in connection.execute(sql)]
    except sqlite3.OperationalError:  # no file or table yet, or locked by the writer for a moment
        return []


def trial_states(db: Path) -> list[str]:
    return query(db, "SELECT state FROM trials")


def kill_mid_trial(process: subprocess.Popen, db: Path, mlflow_db: Path) -> None:
    """SIGKILL once a trial has completed and the next one's MLflow run is training."""
    wait_until(
        lambda: trial_states(db).count("COMPLETE") >= 1 and query(mlflow_db, RUNNING_TRIAL_RUNS),
        "a trial completed and the next one training",
        process=process,
        poll=0.05,
    )
    process.send_signal(signal.SIGKILL)
    process.wait()


def completed(storage: str) -> dict[tuple[str, int], float]:
    return {
        (name, trial.number): trial.value
        for name in optuna.get_all_study_names(storage)
        for trial in optuna.load_study(study_name=name, storage=storage).trials
        if trial.state == optuna.trial.TrialState.COMPLETE
    }


def test_a_main_job_killed_mid_trial_reruns_to_a_written_report(tmp_path):
    data = tmp_path / "data"
    write_folder_dataset(data, {"train": 12, "test": 6})
    db, mlflow_db, out = tmp_path / "optuna.db", tmp_path / "mlflow.db", tmp_path / "report"
    storage = f"sqlite:///{db}"
    settings = {
        "data.name": "folder",
        "data.root": data,
        "data.image_size": 16,
        "data.val_fraction": 0.25,
        "data.batch_size": 16,
        "data.samples_per_class": 4,
        "data.augment": "false",
        "model.embedding_dim": 16,
        "eval.batch_size": 64,
        "optim.lr_decay_epochs": "[]",
        "train.checkpoint_dir": tmp_path / "checkpoints",
    }
    command = [sys.executable, "-m", "bench", "run", "--quick", "--losses", ",".join(LOSSES)]
    command += ["--experiment-name", "killed", "--storage", storage, "--out", str(out), "--no-progress"]
    command += ["--tracking-uri", f"sqlite:///{mlflow_db}", "--device", "cpu"]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]

    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_mid_trial(first, db, mlflow_db)
    before = completed(storage)
    assert before and "RUNNING" in trial_states(db)

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Traceback" not in rerun.stderr
    for name in ("comparison_folder.md", "comparison_folder.csv", "cost_folder.md"):
        assert (out / name).is_file(), name
    markdown = (out / "comparison_folder.md").read_text()
    assert "of them unfinished: killed, failed or still running" in markdown  # the killed trial, named

    after = completed(storage)
    assert {
        key: after[key] for key in before
    } == before  # nothing completed before the kill is lost or redone
    for loss in LOSSES:
        study = optuna.load_study(study_name=f"killed-{loss}", storage=storage)
        finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(finished) == 2, (loss, [t.state.name for t in study.trials])  # --quick's budget, equal
    states = trial_states(db)
    assert states.count("FAIL") == 1 and "RUNNING" not in states  # the killed trial, failed once stale
