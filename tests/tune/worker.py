"""A tuning worker as a separate process, for the tests that SIGKILL one or run two side by side.

From the repository root: python -m tests.tune.worker STORAGE CHECKPOINT_DIR TRIALS EPOCHS GRACE [STALL_AT]
(GRACE: the heartbeat grace period in seconds; STALL_AT: hang after the first epoch of the first trial
numbered STALL_AT or above, writing CHECKPOINT_DIR/stalled first, until killed: tests/tune/stall.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.helpers import WAIT_S, tiny_bundle, tiny_experiment
from tests.tune.stall import stall_trials_from

# Only one live worker at a time (the killed one, then its rerun): none sees another's live trial, so a
# grace this short never fails a live trial, however slow the machine, and a dead worker shows in seconds.
ALONE_GRACE_S = 3
# Several live workers: one whose heartbeat is late on a busy machine must not lose its trial to the other.
# Nothing dies in those tests, so the grace can be longer than any test.
SHARED_GRACE_S = 3600


def tune_worker(storage: str, checkpoints: Path, trials: int, epochs: int, grace: int) -> None:
    """One tuning worker on the `contrastive` study, beating every second; it stops starting trials (and
    waiting for others') after WAIT_S, so a worker that would wait forever fails its test instead."""
    from bench.tune import TuneJob, tune_losses

    exp = tiny_experiment(checkpoints, trials=trials, epochs=epochs, extra=["tune.pruner=none"])
    tune_losses(
        TuneJob(
            exp,
            ["contrastive"],
            storage=storage,
            device="cpu",
            heartbeat_interval=1,
            grace_period=grace,
            poll_s=0.5,
            timeout=WAIT_S,
        ),
        bundle=tiny_bundle(),
    )


def stall_marker(checkpoints: Path) -> Path:
    return checkpoints / "stalled"


def _main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    storage, checkpoints, trials, epochs, grace, *stall_at = argv
    if stall_at:
        stall_trials_from(int(stall_at[0]), stall_marker(Path(checkpoints)))
    tune_worker(storage, Path(checkpoints), int(trials), int(epochs), int(grace))


if __name__ == "__main__":
    _main(sys.argv[1:])
