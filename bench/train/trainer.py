"""The training loop: epochs of steps, with hooks called at fixed points and a replaceable step.

The loop itself only orders things; what happens around it (checkpoints, validation, MLflow, pruning,
progress) lives in hooks (`bench.train.hooks`), and what one batch does lives in a step strategy
(`bench.train.steps`), so a gradient-cached or distributed step plugs in without touching the loop.

Exactness on resume: everything random inside an epoch (batch order, augmentation) is seeded from
(seed, epoch) alone, so a run resumed at epoch e redraws epoch e exactly as an uninterrupted run does.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from bench.config import Experiment

if TYPE_CHECKING:
    from bench.data import DatasetBundle
    from bench.data.samplers import PKSampler
    from bench.train.distributed import Distributed
    from bench.train.memory import CrossBatchMemory


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run is marked FAILED and its last good checkpoint is kept."""


@dataclass
class StepResult:
    """What one optimisation step reports: the loss and the norm of its gradient on the embeddings."""

    loss: float
    grad_norm: float
    images: int


@dataclass
class EpochStats:
    """Running sums over an epoch's steps; the epoch's train metrics come from them."""

    started: float = field(default_factory=time.perf_counter)
    loss: float = 0.0
    grad_norm: float = 0.0
    batches: int = 0
    images: int = 0

    def add(self, step: StepResult) -> None:
        self.loss += step.loss
        self.grad_norm += step.grad_norm
        self.batches += 1
        self.images += step.images

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.started, 1e-9)

    def metrics(self) -> dict[str, float]:
        batches = max(self.batches, 1)
        return {
            "train/loss": self.loss / batches,
            "train/grad_norm": self.grad_norm / batches,
            "images_per_s": self.images_per_s(),
        }


class Step(Protocol):
    """One optimisation step on one batch (the plain step, or a gradient-cached or distributed one)."""

    def __call__(self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> StepResult: ...


class Hook:
    """Called by the Trainer at fixed points; subclasses override only what they need."""

    def before_train(self, trainer: Trainer) -> None:
        """Before the first epoch of this command (also when resuming)."""

    def before_epoch(self, trainer: Trainer) -> None:
        """After the epoch's sampler and seeds are set, before its first step."""

    def after_step(self, trainer: Trainer, step: StepResult) -> None:
        """After each optimisation step."""

    def after_epoch(self, trainer: Trainer) -> None:
        """After the epoch's steps and the scheduler step; `trainer.metrics` holds the epoch's metrics."""

    def after_train(self, trainer: Trainer) -> None:
        """After the last epoch (not when an error or a pruning ends the run)."""


@dataclass
class Trainer:
    """Everything one run trains with; the hooks read and extend its state."""

    exp: Experiment
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: PKSampler
    loader: Iterable
    bundle: DatasetBundle
    device: torch.device
    step: Step
    hooks: Sequence[Hook] = ()
    start_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # validation metrics, one entry per check
    run_id: str | None = None
    epoch: int = 0
    batch: int = 0  # index of the step within the epoch
    metrics: dict[str, float] = field(default_factory=dict)  # the current epoch's metrics
    stats: EpochStats = field(default_factory=EpochStats)
    test_metrics: dict[str, float] = field(default_factory=dict)
    network: torch.nn.Module | None = None  # what steps embed with: the DDP wrapper under torchrun
    dist: Distributed | None = None  # this process's place in a torchrun launch; None: one process
    memory: CrossBatchMemory | None = None  # the cross-batch memory (`loss.memory_size`), checkpointed here

    @property
    def forward_model(self) -> torch.nn.Module:
        """The module a step calls: `network` when set (its forward syncs ranks), else the model."""
        return self.model if self.network is None else self.network

    @property
    def global_step(self) -> int:
        """The current step counted over the whole run, from 0."""
        return self.epoch * len(self.loader) + self.batch

    @property
    def epochs(self) -> int:
        return self.exp.train.epochs

    def train(self) -> None:
        for hook in self.hooks:
            hook.before_train(self)
        for epoch in range(self.start_epoch, self.epochs):
            self.epoch = epoch
            self.sampler.set_epoch(epoch)
            seed_everything(self.exp.train.seed * 100_003 + epoch)
            for hook in self.hooks:
                hook.before_epoch(self)
            self.metrics = self._run_epoch()
            self.scheduler.step()
            for hook in self.hooks:
                hook.after_epoch(self)
        for hook in self.hooks:
            hook.after_train(self)

    def _run_epoch(self) -> dict[str, float]:
        self.model.train()
        self.stats = EpochStats()
        for batch, (images, labels) in enumerate(self.loader):
            self.batch = batch
            result = self.step(self, images, labels)
            self.stats.add(result)
            for hook in self.hooks:
                hook.after_step(self, result)
        return self.stats.metrics()

    def checkpoint_state(self, epoch: int, finished: bool = False) -> dict:
        """What `bench.train.checkpoint` saves: enough to continue exactly after `epoch` epochs."""
        return {
            "epoch": epoch,
            "finished": finished,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "config": self.exp.to_dict(),
            "history": self.history,
            "run_id": self.run_id,
            **({"memory": self.memory.state_dict()} if self.memory is not None else {}),
        }

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint written by `checkpoint_state`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loss_fn.load_state_dict(state["loss"])
        self.start_epoch, self.history, self.run_id = (
            state["epoch"],
            list(state["history"]),
            state.get("run_id"),
        )
        if self.memory is not None and "memory" in state:
            self.memory.load_state_dict(state["memory"], self.device)


def seed_everything(seed: int) -> None:
    """Seed torch and numpy's legacy global RNG (used by some third-party miners)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
