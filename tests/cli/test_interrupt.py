"""Ctrl-C through the real command line: a running `train` gets SIGINT and ends with exit code 130, one line
on stderr and no traceback, leaving a checkpoint that `--resume` accepts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cli import ON_INTERRUPT, main
from bench.train.checkpoint import REQUIRED_KEYS
from tests.helpers import WAIT_S, reaped, wait_until, write_folder_dataset

REPO = Path(__file__).resolve().parents[2]


def hear_ctrl_c() -> None:
    """In the child before it starts: SIGINT as a terminal gives it. A suite started in the background from a
    script (`pytest &`) runs with SIGINT ignored, and an ignored signal stays ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_a_running_train_exits_130_in_one_line(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    argv = [
        "train",
        "--loss",
        "smooth_ap",
        "--device",
        "cpu",
        "--no-progress",
        "--epochs",
        "1000",  # never ends by itself: only the interrupt stops it
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        *("--set", "data.image_size=8", "--set", "data.num_workers=0", "--set", "model.embedding_dim=8"),
        *("--set", f"train.checkpoint_dir={checkpoints}", "--set", "optim.lr_decay_epochs=[]"),
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=hear_ctrl_c,
    )
    checkpoint = checkpoints / "omniglot" / "smooth_ap-seed0" / "last.pt"
    wait_until(checkpoint.exists, f"train to write {checkpoint}", process=process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=WAIT_S)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("20", "INFO"))]
    assert lines == [f"interrupted: resume with --resume (checkpoint {checkpoint})"]
    assert set(REQUIRED_KEYS) <= set(torch.load(checkpoint, weights_only=True))  # whole, so resumable


@pytest.mark.parametrize(
    "argv", [["report"], ["tune", "--losses", "smooth_ap"], ["run", "--quick"], ["data", "check", "omniglot"]]
)
def test_an_interrupt_inside_any_command_is_one_line(argv, monkeypatch, capsys):
    """Wherever the interrupt reaches a handler, main prints one line (how to continue, for the commands
    that continue by re-running) and returns 130."""
    import bench.cli

    args = bench.cli.build_parser().parse_args(argv)

    def interrupted(_args):
        raise KeyboardInterrupt

    args.handler = interrupted
    monkeypatch.setattr(bench.cli, "build_parser", lambda: _Parsed(args))
    assert main(argv) == 130
    hint = {"tune": ON_INTERRUPT["tune"], "run": ON_INTERRUPT["run"]}.get(argv[0])
    assert capsys.readouterr().err == ("interrupted" + (f": {hint}" if hint else "")) + "\n"


class _Parsed:
    """A parser that hands back arguments already parsed."""

    def __init__(self, args) -> None:
        self.args = args

    def parse_args(self, argv):
        return self.args


def test_ctrl_c_to_a_tune_with_workers_is_one_line_from_the_parent(tmp_path):
    """Ctrl-C reaches the whole process group, workers included: the workers stop without a traceback each
    and the command ends with the parent's one line."""
    write_folder_dataset(tmp_path / "data", {"train": 12, "test": 4})
    settings = ["data.name=folder", f"data.root={tmp_path / 'data'}", "data.image_size=16"]
    settings += [
        "data.val_fraction=0.25",
        "data.batch_size=16",
        "data.augment=false",
        "model.embedding_dim=8",
    ]
    settings += [f"train.checkpoint_dir={tmp_path / 'checkpoints'}", "optim.lr_decay_epochs=[]"]
    command = [sys.executable, "-m", "bench", "tune", "--losses", "smooth_ap,triplet", "--trials", "100"]
    command += ["--workers", "2", "--no-final", "--no-progress", "--device", "cpu", "--epochs", "1"]
    command += ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]
    command += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    for setting in settings:
        command += ["--set", setting]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    started = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, preexec_fn=hear_ctrl_c, **pipes)
    with reaped(started) as process:
        trials_seen = 0
        for line in process.stdout:  # each worker's trial lines: both are training
            trials_seen += line.startswith("[worker") and "trial" in line
            if trials_seen >= 2:
                break
        else:
            pytest.fail(f"tune ended (code {process.wait()}) before its workers logged two trials")
        os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: every process in the group
        _, err = process.communicate(timeout=WAIT_S)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert err.rstrip("\n").splitlines()[-1] == f"interrupted: {ON_INTERRUPT['tune']}"
