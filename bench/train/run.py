"""One experiment from initial weights to test metrics: build the parts, wire the hooks, run the trainer."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

import losses
from bench.config import ConfigError, Experiment, experiment_from_dict
from bench.data import DatasetBundle, load_dataset
from bench.data.device_decode import check_decode_device, loader_source, set_decode
from bench.data.samplers import PKSampler, RankShare
from bench.data.seeding import SeededBatches
from bench.device import resolve_device
from bench.models import build_model, parameter_groups
from bench.train.batch_loss import batch_loss
from bench.train.checkpoint import (
    CheckpointError,
    default_checkpoint_path,
    holds_unfinished_run,
    load_checkpoint,
)
from bench.train.fairness import FairnessHook
from bench.train.hooks import (
    CheckpointHook,
    EpochCallback,
    EvaluationHook,
    Hook,
    ProgressHook,
    PruningHook,
    TrackingHook,
    log_run_setup,
)
from bench.train.memory import CrossBatchMemory
from bench.train.resume import CHANGES_TAG, Change, config_changes, describe
from bench.train.steps import StepSettings, build_step, warn_if_chunks_change_batchnorm
from bench.train.trainer import Trainer
from bench.vocabulary import STAGE, Stage

if TYPE_CHECKING:  # MLflow is imported only by callers that track, so training runs where it is absent
    from bench.tracking import Tracker
    from bench.train.distributed import Distributed


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
    resume: bool | str | Path | StartingPoint = False,
    epoch_callback: EpochCallback | None = None,
    evaluate_test: bool = True,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    bundle: DatasetBundle | None = None,
    progress: bool = True,
    dist: Distributed | None = None,
) -> RunResult:
    """Train `exp`, validate each `eval.every_epochs`, test once at the end; log everything to `tracker`.

    `resume=True` continues from the default checkpoint path, a path from that file, a `StartingPoint` from
    the checkpoint `starting_point` checked. The command's `exp` is compared with the checkpoint's config
    (`bench.train.resume`): changes a resumed run can honour (more epochs, ...) are applied and recorded.
    `epoch_callback(epoch, val_metrics)` runs after each validation; it may raise (Optuna pruning), which ends
    the run as KILLED and propagates. `bundle` lets callers reuse a dataset already read.
    `dist`: this process's place in a torchrun launch (`bench.train.distributed`); only rank 0 runs the hooks
    (evaluation, checkpoints, MLflow, progress), so the other ranks' results hold no metrics.
    """
    main = dist is None or dist.is_main
    tracker = tracker if main else None
    dev = dist.device if dist is not None else resolve_device(device)
    check_decode_device(exp.data.decode, dev)
    torch.use_deterministic_algorithms(dev.type == "cpu", warn_only=True)
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    start = resume if isinstance(resume, StartingPoint) else starting_point(exp, resume)
    checkpoint_path, state = start.path, start.state
    loss_fn = losses.get_loss(exp.loss.name, **exp.loss.params)  # before reading data: a typo fails at once
    trainer, in_channels = build_trainer(exp, loss_fn, bundle or load_dataset(exp.data), dev, dist)
    if state is not None:
        trainer.restore(state)
        _continue_with_changes(trainer, start, tracker, in_channels, main)
    resumed = state is not None
    if main:  # the other ranks only train
        trainer.hooks = _hooks(
            checkpoint_path, in_channels, resumed, tracker, evaluate_test, progress, epoch_callback
        )
    try:
        if tracker is None:
            trainer.train()
        else:
            name = run_name or f"{exp.loss.name}-seed{exp.train.seed}"
            with tracker.run(
                name, {STAGE: Stage.TRAIN, **(tags or {})}, parent_run_id, run_id=trainer.run_id
            ) as run:
                if resumed:
                    _log_resume(tracker, run, trainer, start, new_run=trainer.run_id is None)
                trainer.run_id = run
                trainer.train()
    except KeyboardInterrupt as interrupt:
        raise KeyboardInterrupt(f"resume with --resume (checkpoint {checkpoint_path})") from interrupt
    return RunResult(trainer.run_id, checkpoint_path, exp.train.epochs, trainer.history, trainer.test_metrics)


def _hooks(
    checkpoint_path: Path,
    in_channels: int,
    resumed: bool,
    tracker: Tracker | None,
    evaluate_test: bool,
    progress: bool,
    epoch_callback: EpochCallback | None,
) -> list[Hook]:
    """What runs around the loop: evaluation and checkpoints always, tracking, progress and pruning when
    asked for, in the order they are called."""
    hooks: list[Hook] = [EvaluationHook(evaluate_test), CheckpointHook(checkpoint_path, in_channels, resumed)]
    if tracker is not None:
        hooks.append(TrackingHook(tracker, resumed, checkpoint_path))
        hooks.append(FairnessHook(tracker))
    if progress:
        hooks.append(ProgressHook())
    if epoch_callback is not None:
        hooks.append(PruningHook(epoch_callback))
    return hooks


@dataclass
class StartingPoint:
    """Where a run starts: its checkpoint file and, when resuming, the state saved there and the changes
    the command makes to the checkpoint's config (all honourable)."""

    path: Path
    state: dict | None = None
    changes: list[Change] = field(default_factory=list)


def starting_point(exp: Experiment, resume: bool | str | Path) -> StartingPoint:
    """Check where `exp` starts before anything is written: a fresh start never overwrites an unfinished run,
    a resume reads a whole checkpoint (else CheckpointError) and refuses changes it cannot honour."""
    path = default_checkpoint_path(exp) if resume in (False, True) else Path(resume)
    if not resume:
        if holds_unfinished_run(path):
            raise FileExistsError(
                f"{path} holds an unfinished run; continue it with --resume, or delete it to start over"
            )
        return StartingPoint(path)
    if resume is True and not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path} to resume (found by experiment name, loss and seed); "
            "name another file with --resume PATH"
        )
    state = load_checkpoint(path)
    try:
        stored = experiment_from_dict(state["config"])
    except ConfigError as error:
        raise CheckpointError(path, f"holds a config this version cannot read ({error})") from None
    return StartingPoint(path, state, config_changes(stored, exp, state["epoch"], path))


def _continue_with_changes(
    trainer: Trainer, start: StartingPoint, tracker: Tracker | None, in_channels: int, main: bool = True
) -> None:
    """Apply the command's changes to a restored run and say what the resume does.

    The changed config is saved at once with `finished` cleared, so a run extended beyond its end and killed
    before its next epoch is resumed, never overwritten, by the next command. Under torchrun only rank 0
    (`main`) saves and speaks.
    """
    done, epochs = start.state["epoch"], trainer.exp.train.epochs
    trainer.scheduler.milestones = Counter(trainer.exp.optim.lr_decay_epochs)  # restore() loaded the old ones
    note = f"resuming {start.path} after epoch {done} of {epochs}"
    if start.changes:
        note += f", changed: {describe(start.changes)}"
        if main:
            CheckpointHook(start.path, in_channels, resumed=True).save(trainer, done)
    if done >= epochs:
        note += "; every epoch is trained (raise --epochs to train more)"
    if tracker is not None and trainer.run_id is not None and not tracker.has_run(trainer.run_id):
        from bench.tracking import redact

        note += f"; MLflow run {trainer.run_id} is not in {redact(tracker.uri)}: a new run logs the rest"
        trainer.run_id = None
    if main:
        print(note, file=sys.stderr)


def _log_resume(tracker: Tracker, run_id: str, trainer: Trainer, start: StartingPoint, new_run: bool) -> None:
    """A new run gets the run's setup; the changes applied are appended to the run's tag `resume.changes`."""
    if new_run:
        log_run_setup(tracker, run_id, trainer.exp, trainer.bundle)
    if start.changes:
        entry = f"after epoch {start.state['epoch']}: {describe(start.changes)}"
        earlier = tracker.get_run(run_id).data.tags.get(CHANGES_TAG)
        tracker.set_tags(run_id, {CHANGES_TAG: f"{earlier}\n{entry}" if earlier else entry})


def build_trainer(
    exp: Experiment,
    loss_fn: torch.nn.Module,
    bundle: DatasetBundle,
    dev: torch.device,
    dist: Distributed | None = None,
) -> tuple[Trainer, int]:
    """Model, optimizer, schedule, the P x K loader, the step and the cross-batch memory of `exp`, seeded by
    `train.seed`; and the input channels. `loss_fn` is the loss `exp.loss` names: the step composes with
    what that loss's spec says it can do. Under torchrun (`dist`) the model is wrapped in DDP and the loader
    gives this rank's share of each global batch."""
    set_decode(bundle, exp.data.decode)
    sample_image, _ = bundle.train[0]
    in_channels = int(sample_image.shape[0])
    model = build_model(exp.model, in_channels, exp.train.seed).to(dev)
    if exp.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    spec = losses.get_spec(exp.loss.name)  # what the loss can do; `loss_fn` is one built from it
    network = None
    if dist is not None:
        if spec.capabilities.has_parameters:
            raise ConfigError(
                f"loss {exp.loss.name!r} has parameters: under torchrun only the model's gradients are "
                "synchronised, so train it in one process"
            )
        network = dist.wrap(model, exp.train.sync_bn)
    loss_fn = loss_fn.to(dev)
    groups = parameter_groups(model, exp.optim.lr, exp.optim.head_lr)
    if spec.capabilities.has_parameters:
        groups.append(
            {"params": list(loss_fn.parameters()), "lr": exp.optim.head_lr or exp.optim.lr, "name": "loss"}
        )
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    optimizer = optimizers[exp.optim.name](groups, lr=exp.optim.lr, weight_decay=exp.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, exp.optim.lr_decay_epochs, exp.optim.lr_decay_gamma
    )
    sampler = PKSampler(bundle.train.labels, exp.data.batch_size, exp.data.samples_per_class, exp.train.seed)
    batches = SeededBatches(sampler)
    if dist is not None:  # the rank's share of the global batch, each image with its single-process seed
        batches = RankShare(sampler, dist.rank, dist.world_size, batches)
    loader = DataLoader(  # per-sample augmentation seeds: the same batches with or without workers
        **loader_source(bundle.train, seeded=True),  # data.decode: gpu hands over file bytes
        batch_sampler=batches,
        num_workers=exp.data.num_workers,
        pin_memory=dev.type == "cuda",
        persistent_workers=False,
    )
    memory = cross_batch_memory(exp, spec)
    loss = batch_loss(loss_fn, spec.capabilities.splits_by_query, dist, memory)
    step = build_step(StepSettings.of(exp, dev), loss, exp.train.chunk_size)
    if dist is None or dist.is_main:
        warn_if_chunks_change_batchnorm(model, exp.train.chunk_size)
    parts = (exp, model, loss_fn, optimizer, scheduler, sampler, loader, bundle, dev, step)
    return Trainer(*parts, network=network, dist=dist, memory=memory), in_channels


def cross_batch_memory(exp: Experiment, spec: losses.LossSpec) -> CrossBatchMemory | None:
    """The memory `loss.memory_size` asks for, if any; the loss must take the queries x gallery form."""
    if not exp.loss.memory_size:
        return None
    if not spec.capabilities.refs_form:
        raise ConfigError(
            f"loss.memory_size: loss {exp.loss.name!r} ({spec.cls.__name__}) has no queries x gallery "
            "form, forward(embeddings, labels, ref_embeddings, ref_labels, query_offset) (losses._refs)"
        )
    return CrossBatchMemory(exp.loss.memory_size, exp.loss.memory_start_step)
