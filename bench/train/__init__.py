"""Training: `train_and_evaluate` runs one experiment; the trainer, hooks and steps it is built from.

Public names are re-exported here, so callers write `from bench.train import train_and_evaluate`.
"""

from bench.device import resolve_device
from bench.train.checkpoint import (
    CHECKPOINT_FORMAT,
    default_checkpoint_path,
    holds_unfinished_run,
    load_checkpoint,
    model_from_checkpoint,
)
from bench.train.hooks import Hook, loggable_params, skipped_images
from bench.train.run import RunResult, build_trainer, train_and_evaluate
from bench.train.steps import PlainStep
from bench.train.trainer import NonFiniteLossError, StepResult, Trainer, seed_everything

__all__ = [
    "CHECKPOINT_FORMAT",
    "Hook",
    "NonFiniteLossError",
    "PlainStep",
    "RunResult",
    "StepResult",
    "Trainer",
    "build_trainer",
    "default_checkpoint_path",
    "holds_unfinished_run",
    "load_checkpoint",
    "loggable_params",
    "model_from_checkpoint",
    "resolve_device",
    "seed_everything",
    "skipped_images",
    "train_and_evaluate",
]
