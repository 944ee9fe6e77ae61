"""The fairness receipt of a training run: what it started from, what it saw, what it was scored on.

A comparison of losses is fair when, at one seed, every loss starts from the same initial weights and sees the
same batches with the same augmentation seeds, and when tuning never looks at a test split. `FairnessHook`
records that evidence as MLflow tags on every tracked run, so `bench.report.receipt` can check it from the
store alone, without trusting the code that trained:

- `fairness.init_hash`: SHA-256 of the weights before the first step (`weights_hash`).
- `fairness.batch_digests`: one digest per epoch trained so far, taken when the epoch starts: its sampled
  indices (drawn from a copy of the sampler, so no RNG that training uses is consumed) and the torch seed the
  epoch starts from (augmentation and DataLoader worker seeds derive from it).
  `fairness.batches_hash` is the SHA-256 of that list.
- `fairness.splits`: the splits evaluated so far, in order (`val`, then `test` for a run that was tested).

A resumed run continues the same MLflow run: it keeps the initial-weights hash its first start wrote
(rebuilt with `build_model` if that start died before writing it) and the digests of the epochs before the
resume point, so it ends with the receipt of an uninterrupted run.
"""

from __future__ import annotations

import copy
import hashlib
from typing import TYPE_CHECKING

import numpy as np
import torch

from bench.models import build_model
from bench.train.trainer import Hook, Trainer

if TYPE_CHECKING:  # MLflow is imported only by callers that track
    from bench.tracking import Tracker

INIT_TAG = "fairness.init_hash"
BATCHES_TAG = "fairness.batches_hash"
DIGESTS_TAG = "fairness.batch_digests"
SPLITS_TAG = "fairness.splits"
EPOCH_DIGEST_CHARS = 16  # per-epoch digests only need to differ; 64 bits keep the tag short


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 over the state dict in name order: each entry's name, dtype, shape and raw bytes (on the CPU,
    contiguous, so the device and memory format do not change it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def epoch_digest(trainer: Trainer) -> str:
    """The current epoch's batch stream: every sampled index in order, and the epoch's torch seed."""
    digest = hashlib.sha256()
    for batch in copy.deepcopy(trainer.sampler):  # the sampler's epoch is already set by the trainer
        digest.update(np.asarray(batch, dtype=np.int64).tobytes())
        digest.update(b";")
    digest.update(f"seed={torch.initial_seed()}".encode())
    return digest.hexdigest()[:EPOCH_DIGEST_CHARS]


def batches_hash(digests: list[str]) -> str:
    return hashlib.sha256(",".join(digests).encode()).hexdigest()


def evaluated_splits(trainer: Trainer) -> list[str]:
    """Split names, in the order first evaluated, read off the metrics the run produced (`val/...`,
    `test/...`)."""
    keys = [key for entry in trainer.history for key in entry] + list(trainer.test_metrics)
    return list(dict.fromkeys(key.split("/", 1)[0] for key in keys if "/" in key))


class FairnessHook(Hook):
    """Writes the run's receipt tags: the initial weights at the start, each epoch's batch digest as the
    epoch starts, the evaluated splits whenever they change."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.digests: list[str] | None = []  # None: a resume found earlier epochs' digests missing
        self.splits: list[str] = []

    def before_train(self, trainer: Trainer) -> None:
        if trainer.start_epoch == 0:  # nothing has been trained yet: these are the initial weights
            self.tracker.set_tags(trainer.run_id, {INIT_TAG: weights_hash(trainer.model)})
            return
        tags = self.tracker.get_run(trainer.run_id).data.tags
        if INIT_TAG not in tags:
            in_channels = int(trainer.bundle.train[0][0].shape[0])
            initial = build_model(trainer.exp.model, in_channels, trainer.exp.train.seed)
            self.tracker.set_tags(trainer.run_id, {INIT_TAG: weights_hash(initial)})
        stored = [d for d in tags.get(DIGESTS_TAG, "").split(",") if d]
        # digests are written before each epoch's checkpoint, so a resume point always has its earlier ones
        self.digests = stored[: trainer.start_epoch] if len(stored) >= trainer.start_epoch else None
        if self.digests is None:  # an incomplete stream gets no hash: the report lists the run as unchecked
            self.tracker.set_tags(trainer.run_id, {BATCHES_TAG: ""})
        self.splits = evaluated_splits(trainer)

    def before_epoch(self, trainer: Trainer) -> None:
        if self.digests is None:
            return
        self.digests.append(epoch_digest(trainer))
        self.tracker.set_tags(
            trainer.run_id, {DIGESTS_TAG: ",".join(self.digests), BATCHES_TAG: batches_hash(self.digests)}
        )

    def after_epoch(self, trainer: Trainer) -> None:
        self._record_splits(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self._record_splits(trainer)

    def _record_splits(self, trainer: Trainer) -> None:
        splits = evaluated_splits(trainer)
        if splits != self.splits:
            self.splits = splits
            self.tracker.set_tags(trainer.run_id, {SPLITS_TAG: ",".join(splits)})
