"""One experiment from initial weights to test metrics: build the parts, wire the hooks, run the trainer."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

import losses
from bench.config import Experiment, experiment_from_dict
from bench.data import DatasetBundle, load_dataset
from bench.data.samplers import PKSampler
from bench.device import resolve_device
from bench.models import build_model, parameter_groups
from bench.train.checkpoint import default_checkpoint_path, holds_unfinished_run, load_checkpoint
from bench.train.hooks import (
    CheckpointHook,
    EpochCallback,
    EvaluationHook,
    Hook,
    ProgressHook,
    PruningHook,
    TrackingHook,
)
from bench.train.steps import PlainStep
from bench.train.trainer import Trainer

if TYPE_CHECKING:  # MLflow is imported only by callers that track, so training runs where it is absent
    from bench.tracking import Tracker


@dataclass
class RunResult:
    run_id: str | None
    checkpoint: Path
    epochs: int
    val_history: list[dict[str, float]] = field(default_factory=list)
    test_metrics: dict[str, float] = field(default_factory=dict)


def train_and_evaluate(
    exp: Experiment,
    tracker: Tracker | None = None,
    *,
    device: str = "auto",
    resume: bool | str | Path = False,
    epoch_callback: EpochCallback | None = None,
    evaluate_test: bool = True,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    bundle: DatasetBundle | None = None,
    progress: bool = True,
) -> RunResult:
    """Train `exp`, validate each `eval.every_epochs`, test once at the end; log everything to `tracker`.

    `resume=True` continues from the default checkpoint path, a path continues from that file.
    `epoch_callback(epoch, val_metrics)` runs after each validation; it may raise (Optuna pruning), which ends
    the run as KILLED and propagates. `bundle` lets callers reuse a dataset already read.
    """
    dev = resolve_device(device)
    torch.use_deterministic_algorithms(dev.type == "cpu", warn_only=True)
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    checkpoint_path, state = _starting_point(exp, resume)
    if state is not None:
        exp = experiment_from_dict(state["config"])  # the checkpoint's config wins: a resume must not drift
    loss_fn = losses.get_loss(exp.loss.name, **exp.loss.params)  # before reading data: a typo fails at once
    trainer, in_channels = build_trainer(exp, loss_fn, bundle or load_dataset(exp.data), dev)
    if state is not None:
        trainer.restore(state)
    resumed = state is not None
    hooks: list[Hook] = [EvaluationHook(evaluate_test), CheckpointHook(checkpoint_path, in_channels, resumed)]
    if tracker is not None:
        hooks.append(TrackingHook(tracker, resumed, checkpoint_path))
    if progress:
        hooks.append(ProgressHook())
    if epoch_callback is not None:
        hooks.append(PruningHook(epoch_callback))
    trainer.hooks = hooks
    try:
        if tracker is None:
            trainer.train()
        else:
            name = run_name or f"{exp.loss.name}-seed{exp.train.seed}"
            with tracker.run(
                name, {"stage": "train", **(tags or {})}, parent_run_id, run_id=trainer.run_id
            ) as run:
                trainer.run_id = run
                trainer.train()
    except KeyboardInterrupt:
        print(f"\ninterrupted: resume with --resume (checkpoint {checkpoint_path})", file=sys.stderr)
        raise
    return RunResult(trainer.run_id, checkpoint_path, exp.train.epochs, trainer.history, trainer.test_metrics)


def _starting_point(exp: Experiment, resume: bool | str | Path) -> tuple[Path, dict | None]:
    """The checkpoint path and, when resuming, its state; a fresh start never overwrites an unfinished run."""
    path = default_checkpoint_path(exp) if resume in (False, True) else Path(resume)
    if resume:
        return path, load_checkpoint(path)
    if holds_unfinished_run(path):
        raise FileExistsError(
            f"{path} holds an unfinished run; continue it with --resume, or delete it to start over"
        )
    return path, None


def build_trainer(
    exp: Experiment, loss_fn: torch.nn.Module, bundle: DatasetBundle, dev: torch.device
) -> tuple[Trainer, int]:
    """Model, optimizer, schedule and the P x K loader of `exp`, seeded by `train.seed`; and the input channels."""
    sample_image, _ = bundle.train[0]
    in_channels = int(sample_image.shape[0])
    model = build_model(exp.model, in_channels, exp.train.seed).to(dev)
    if dev.type == "cuda" and exp.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = loss_fn.to(dev)
    groups = parameter_groups(model, exp.optim.lr, exp.optim.head_lr)
    if list(loss_fn.parameters()):
        groups.append(
            {"params": list(loss_fn.parameters()), "lr": exp.optim.head_lr or exp.optim.lr, "name": "loss"}
        )
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    optimizer = optimizers[exp.optim.name](groups, lr=exp.optim.lr, weight_decay=exp.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, exp.optim.lr_decay_epochs, exp.optim.lr_decay_gamma
    )
    sampler = PKSampler(bundle.train.labels, exp.data.batch_size, exp.data.samples_per_class, exp.train.seed)
    loader = DataLoader(
        bundle.train,
        batch_sampler=sampler,
        num_workers=exp.data.num_workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    trainer = Trainer(exp, model, loss_fn, optimizer, scheduler, sampler, loader, bundle, dev, PlainStep())
    return trainer, in_channels
