"""Ctrl-C through the real command line: a running `train` gets SIGINT and ends with exit code 130, one line
on stderr and no traceback, leaving a checkpoint that `--resume` accepts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.cli import ON_INTERRUPT, main
from bench.train.checkpoint import REQUIRED_KEYS

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 600  # a bound for the event, not a timing: the checkpoint appears after the first epoch


def wait_for(path: Path, process: subprocess.Popen, bound_s: float = WAIT_S) -> None:
    """Until `path` exists; fails if the process ends first or the bound passes."""
    deadline = time.monotonic() + bound_s
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"train ended (code {process.returncode}) before writing {path}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {path} within {bound_s} s")
        time.sleep(0.2)


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
    )
    checkpoint = checkpoints / "omniglot" / "smooth_ap-seed0" / "last.pt"
    wait_for(checkpoint, process)
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
