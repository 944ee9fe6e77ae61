"""A tuning worker as a separate process, for the tests that SIGKILL one or run two side by side.

From the repository root: python -m tests.tune.worker STORAGE CHECKPOINT_DIR TRIALS EPOCHS
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.helpers import tiny_bundle, tiny_experiment


def tune_worker(storage: str, checkpoints: Path, trials: int, epochs: int) -> None:
    """One tuning worker on the `contrastive` study, with heartbeats fast enough for a test to see a dead
    one."""
    from bench.tune import TuneJob, tune_losses

    exp = tiny_experiment(checkpoints, trials=trials, epochs=epochs, extra=["tune.pruner=none"])
    tune_losses(
        TuneJob(
            exp,
            ["contrastive"],
            storage=storage,
            device="cpu",
            heartbeat_interval=1,
            grace_period=3,
            poll_s=0.5,
        ),
        bundle=tiny_bundle(),
    )


def _main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    tune_worker(argv[0], Path(argv[1]), int(argv[2]), int(argv[3]))


if __name__ == "__main__":
    _main(sys.argv[1:])
